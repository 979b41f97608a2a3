# espnet3-rules: sharded, resumable ESPnet3-style jobs with Snakemake as the orchestrator.
#
#   snakemake -n            # dry-run: contract checks + one plan line per job + every shard job
#   snakemake --cores 2     # run locally
#   snakemake --profile slurm   # one SLURM job per shard
#   snakemake --report report.html   # scores, shard plots, plans (after a run)
#
# All logic lives in the espnet3_rules package; the rules only wire paths to its CLI.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/shard.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
