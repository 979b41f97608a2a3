import json
import re
import sys

from espnet3_rules.jobs import Unit, describe_unit, exit_on_contract_error, measure_specs, units_from_config

# One unit per job: <output_dir>/<shard_subdir> holds manifest.json, split.N/, merge.done.
# Contract errors stop snakemake (also -n) with one line; no job may write into config/.
with exit_on_contract_error():
    UNITS = units_from_config(config, protected_dirs=("config", f"{workflow.basedir}/config"))


wildcard_constraints:
    unit="|".join(re.escape(root) for root in sorted(UNITS, key=len, reverse=True)),
    i=r"\d+",


if workflow.is_main_process:
    with exit_on_contract_error():
        for _unit in UNITS.values():
            print(f"espnet3-rules plan: {describe_unit(_unit)}", file=sys.stderr)


def unit_of(wildcards):
    """The unit a job's {unit} wildcard names."""
    return UNITS[wildcards.unit]


def shard_done_files(wildcards):
    """Every split.N/done of a unit, for its merge."""
    unit = unit_of(wildcards)
    return [f"{unit.root}/split.{i}/done" for i in range(unit.n_shards)]


def measure_of(wildcards):
    """The measure spec a job's {metrics_dir} wildcard names."""
    return MEASURES[wildcards.metrics_dir]


def shard_resource(name):
    """Per-shard resource ``name`` of the job (``resources:`` config), grown per retry attempt."""
    return lambda wildcards, attempt: unit_of(wildcards).shard_resource(name, attempt)


def all_targets():
    """Every unit's merge.done and every shard's done.

    The shard markers are targets too: Snakemake does not rebuild a deleted
    intermediate file whose consumer is up to date, so a deleted split.N/done
    would otherwise go unnoticed; as a target it reruns that shard, then the merge.
    """
    targets = []
    for unit in UNITS.values():
        targets += [f"{unit.root}/split.{i}/done" for i in range(unit.n_shards)]
        targets.append(f"{unit.root}/merge.done")
    return targets + [spec["output"] for spec in MEASURES.values()]
