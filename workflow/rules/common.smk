import json
import re
import sys

from espnet3_rules.cli.config import GROWING_RESOURCES, Unit, describe_unit, exit_on_contract_error, measure_specs, units_from_config

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


def per_shard(value_of):
    """``value_of(unit)`` for the shard rule: the value itself where every job has the same,
    else a function of the shard's wildcards (which Snakemake inspects and calls per shard,
    the larger part of a 10,000-shard dry-run)."""
    values = [value_of(unit) for unit in UNITS.values()]
    if values and all(value == values[0] for value in values):
        return values[0]
    return lambda wildcards: value_of(unit_of(wildcards))


def shard_resource(name):
    """Per-shard resource ``name`` of the job (``resources:`` config); ``mem_mb`` and
    ``runtime`` grow per retry attempt unless ``attempt_scale`` is 1."""
    if name in GROWING_RESOURCES and any(u.shard_resource("attempt_scale") != 1 for u in UNITS.values()):
        return lambda wildcards, attempt: unit_of(wildcards).shard_resource(name, attempt)
    return per_shard(lambda unit: unit.shard_resource(name))


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
