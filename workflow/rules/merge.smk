localrules:
    merge,


rule merge:
    """Merge every shard of a unit (only shards whose done matches the manifest)."""
    input:
        manifest="{unit}/manifest.json",
        shards=shard_done_files,
    output:
        "{unit}/merge.done",
    log:
        "{unit}/logs/merge.log",
    shell:
        "python -m espnet3_rules merge --manifest {input.manifest:q} > {log:q} 2>&1"
