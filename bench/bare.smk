# The reference of the dry-run and local-run parts of run_bench.py: bare Snakemake, the same DAG
# shape as the project's job (plan -> N shards -> merge -> report items), `touch` rules, no package code.
#
#   snakemake -s bench/bare.smk -d DIR --config n_shards=1000 -n

N_SHARDS = int(config["n_shards"])


rule all:
    input:
        "results/merge.done",
        "results/report/shards.svg",
    default_target: True


rule plan:
    output:
        "results/manifest.json",
    shell:
        "touch {output}"


rule shard:
    input:
        "results/manifest.json",
    output:
        "results/split.{i}/done",
    shell:
        "touch {output}"


rule merge:
    input:
        expand("results/split.{i}/done", i=range(N_SHARDS)),
    output:
        "results/merge.done",
    shell:
        "touch {output}"


rule report:
    input:
        "results/merge.done",
    output:
        "results/report/shards.svg",
    shell:
        "touch {output}"
