localrules:
    merge,


rule merge:
    """Merge every shard of a job (only shards whose done matches the manifest)."""
    input:
        manifest="{job}/manifest.json",
        shards=shard_done_files,
    output:
        "{job}/merge.done",
    log:
        "{job}/logs/merge.log",
    shell:
        "\"$ESPNET3_RULES_PYTHON\" -m espnet3_rules merge --manifest {input.manifest:q} > {log:q} 2>&1"
