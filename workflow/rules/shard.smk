rule shard:
    """One shard: build the env once, forward over its items, write split.N/done last."""
    input:
        manifest="{job}/manifest.json",
        data=per_shard(lambda job: job.inputs),
    output:
        "{job}/split.{i}/done",
    log:
        "{job}/logs/split.{i}.log",
    group:
        per_shard(lambda job: resource_of(job, "group") or None)
    threads: shard_resource("threads")
    resources:
        mem_mb=shard_resource("mem_mb"),
        runtime=shard_resource("runtime"),
        gpu=shard_resource("gpu"),
        gpu_model=shard_resource("gpu_model"),
        slurm_partition=shard_resource("slurm_partition"),
        slurm_account=shard_resource("slurm_account"),
        slurm_extra=shard_resource("slurm_extra"),
    shell:
        # exec: a SIGTERM (scancel, --signal, preemption) reaches the shard, not a shell that dies of it
        # first; Snakemake then waits for the shard's commit, and the SLURM step ends with the shard.
        # The client hands the shard to a warm fork server, or execs `python -m espnet3_rules`.
        "exec \"$ESPNET3_RULES_PYTHON\" -S -P \"$ESPNET3_RULES_SHARD_CLIENT\" run-shard --manifest {input.manifest:q} --shard {wildcards.i}"
        " --gpus {resources.gpu} --log {log:q} > {log:q} 2>&1"
