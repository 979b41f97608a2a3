"""The ``measure`` section of a job: which test sets it scores, and scoring them into ``metrics.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping

from espnet3_rules.cli.config import jobs_of
from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.engine.job import JobSpec, build_provider


def measure_specs(config: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per job ``output_dir`` (holding ``metrics.json``): the job's ``measure`` section and its test sets' jobs."""
    specs: Dict[str, Dict[str, Any]] = {}
    for job_name, settings in config["jobs"].items():
        if not settings.get("measure"):
            continue
        jobs = jobs_of(job_name, settings)
        if any(job.test_set is None for job in jobs) and not settings.get("shard_subdir"):
            raise ContractError(f"jobs.{job_name}.measure needs test_sets (or a shard_subdir) to name the test set")
        metrics_dir = Path(settings["output_dir"]).as_posix()
        if metrics_dir in specs:
            raise ContractError(
                f"jobs.{job_name}.measure: {metrics_dir}/metrics.json is also written by job {specs[metrics_dir]['job']!r}"
            )
        specs[metrics_dir] = {
            "job": job_name,
            "output": f"{metrics_dir}/metrics.json",
            "measure": dict(settings["measure"]),
            "jobs": [job.to_dict() for job in jobs],
            "merged": [f"{job.root.as_posix()}/merge.done" for job in jobs],
        }
    return specs


def measure_job(spec: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Score every test set of one job (a :func:`measure_specs` entry) into its ``metrics.json``."""
    from espnet3_rules.systems.base.metric import build_metrics, provider_dataset_source, score

    jobs = [JobSpec.from_dict(fields) for fields in spec["jobs"]]
    section = spec["measure"]
    return score(
        build_metrics(section["metrics"]),
        jobs[0].root.parent,
        [job.root.name for job in jobs],
        datasets={job.root.name: provider_dataset_source(build_provider(job)) for job in jobs},
        idx_key=section.get("idx_key") or "utt_id",
        dataset_artifacts=section.get("dataset_artifacts"),
        output_path=spec["output"],
    )
