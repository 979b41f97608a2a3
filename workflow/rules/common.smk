import json
import os
import re
import sys

from espnet3_rules.cli import forkclient
from espnet3_rules.cli.config import GROWING_RESOURCES, describe_job, exit_on_contract_error, jobs_from_config, shard_resource as resource_of
from espnet3_rules.cli.measure import measure_specs
from espnet3_rules.cli.snakemake_run import jobs_from_manifests

# One job description per job (or test set): <output_dir>/<shard_subdir> holds manifest.json,
# split.N/, merge.done. The config is checked against the schema (one line naming the key);
# contract errors stop snakemake (also -n) with one line; no job may write into config/.
# runner(indices) with a parallel config (workflow/planned.smk) passes its planned manifests instead.
# Every rule runs the interpreter that runs Snakemake (it imports espnet3_rules, above), not
# whatever `python` PATH finds first: no launcher (pyenv shim, ~60 ms) per shard, no other env.
# The shell commands read it from the environment they inherit ("$ESPNET3_RULES_PYTHON"): not a
# param, so that another path to the same installation reruns nothing. The shard rule runs the
# fork server's client as a script without site ("$ESPNET3_RULES_SHARD_CLIENT", see forkclient).
os.environ.update(ESPNET3_RULES_PYTHON=sys.executable, ESPNET3_RULES_SHARD_CLIENT=forkclient.__file__)

with exit_on_contract_error():
    if "manifests" in config:
        JOBS = jobs_from_manifests(config["manifests"])
        MEASURES = {}
    else:
        JOBS = jobs_from_config(config, protected_dirs=("config", f"{workflow.basedir}/config"))
        MEASURES = measure_specs(config)


wildcard_constraints:
    job="|".join(re.escape(root) for root in sorted(JOBS, key=len, reverse=True)),
    i=r"\d+",


if workflow.is_main_process and "manifests" not in config:
    with exit_on_contract_error():
        for _job in JOBS.values():
            print(f"espnet3-rules plan: {describe_job(_job)}", file=sys.stderr)


def job_of(wildcards):
    """The job description that a rule's {job} wildcard (its root directory) names."""
    return JOBS[wildcards.job]


def shard_done_files(wildcards):
    """Every split.N/done of a job, for its merge."""
    job = job_of(wildcards)
    return [f"{wildcards.job}/split.{i}/done" for i in range(job.n_shards)]


def measure_of(wildcards):
    """The measure spec a job's {metrics_dir} wildcard names."""
    return MEASURES[wildcards.metrics_dir]


def per_shard(value_of):
    """``value_of(job)`` for the shard rule: the value itself where every job has the same,
    else a function of the shard's wildcards (which Snakemake inspects and calls per shard,
    the larger part of a 10,000-shard dry-run)."""
    values = [value_of(job) for job in JOBS.values()]
    if values and all(value == values[0] for value in values):
        return values[0]
    return lambda wildcards: value_of(job_of(wildcards))


def shard_resource(name):
    """Per-shard resource ``name`` of the job (``resources:`` config); ``mem_mb`` and
    ``runtime`` grow per retry attempt unless ``attempt_scale`` is 1."""
    if name in GROWING_RESOURCES and any(resource_of(job, "attempt_scale") != 1 for job in JOBS.values()):
        return lambda wildcards, attempt: resource_of(job_of(wildcards), name, attempt)
    return per_shard(lambda job: resource_of(job, name))


def all_targets():
    """Every job's merge.done and report items, each split.N/done missing under an existing
    merge.done, and every measured job's metrics.json and scores table.

    Snakemake does not rebuild a deleted intermediate file whose consumer is up to date, so such
    a split.N/done is a target of its own: it reruns that shard, then the merge. Where merge.done
    is missing the merge needs every shard anyway, and listing them all would double the DAG work
    of a first run (one target per shard).
    """
    targets = []
    for root, job in JOBS.items():
        merged = f"{root}/merge.done"
        if os.path.exists(merged):
            targets += [f"{root}/split.{i}/done" for i in range(job.n_shards) if not os.path.exists(f"{root}/split.{i}/done")]
        targets += [merged, f"{root}/report/shards.svg"]
    return targets + [f"{metrics_dir}/{name}" for metrics_dir in MEASURES for name in ("metrics.json", "report/scores.html")]


def report_category(wildcards):
    """The job a job's report item belongs to."""
    return job_of(wildcards).name


def report_subcategory(wildcards):
    """The test set a job's report item belongs to ("shards" for a job without test sets)."""
    return job_of(wildcards).test_set or "shards"
