# Entry workflow of runner(indices) with a parallel config (espnet3_rules.engine.snakemake_run):
# the project's own shard rule over jobs that runner(indices) planned already.
#
#   config: manifests: [<job root>/manifest.json, ...]   (no config/config.yaml is read)
#   targets: the pending shards' <job root>/split.N/done, forced

from snakemake.utils import min_version

min_version("9.0")


include: "rules/common.smk"
include: "rules/shard.smk"
