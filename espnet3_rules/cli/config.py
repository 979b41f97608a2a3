"""The YAML config: schema check, one :class:`JobSpec` per job (or test set), path checks, resources.

The Snakefile and the CLI both go through here, so a job means the same thing
to ``snakemake`` and to ``python -m espnet3_rules``. Nothing here builds a
provider or a model: the dry-run line is made from the classes alone.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, Iterator, List, Mapping

from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.engine.job import (
    JobSpec,
    check_classes,
    count_items_without_building,
    provider_config,
    runner_arguments,
    runner_class,
)
from espnet3_rules.engine.plan import make_plan

#: The config's JSON schema (package data; ``workflow/schemas/config.schema.yaml`` links to it).
SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")

DEFAULT_RESOURCES = {
    "threads": 1,
    "mem_mb": 2000,
    "runtime": 60,
    "gpu": 0,
    "gpu_model": "",
    "slurm_partition": "",
    "slurm_account": "",
    "slurm_extra": "",
    "attempt_scale": 1.5,
    "group": "",
}
GROWING_RESOURCES = ("mem_mb", "runtime")
#: Job keys that are not fields of a JobSpec.
SECTION_KEYS = ("test_sets", "measure")


def check_config(config: Any, source: str = "config") -> None:
    """Validate ``config`` against the schema; the first error as one line naming the key."""
    import jsonschema
    import yaml

    if not isinstance(config, Mapping):
        raise ContractError(f"{source}: must be a mapping with a 'jobs' section, got {type(config).__name__}")
    schema = yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(dict(config)))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ContractError(f"{source}: {where}: {error.message}")


def read_config(path: Any) -> Dict[str, Any]:
    """Load and check a YAML config file (what ``--config`` names)."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ContractError(f"{path}: cannot read config ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ContractError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    check_config(config, str(path))
    return config


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated by ``override``, recursing into nested mappings."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def jobs_of(name: str, job: Mapping[str, Any]) -> List[JobSpec]:
    """The job descriptions of one (schema-checked) job: itself, or one per entry of its ``test_sets``.

    A test set shares the job's settings, with its own ``shard_subdir``
    (``<shard_subdir>/<test set>``) and its own ``provider_config`` (merged
    over the job's), ``params``, ``items`` and ``inputs``.
    """
    base = {k: v for k, v in job.items() if v is not None and k not in SECTION_KEYS}
    test_sets = job.get("test_sets") or []
    if not test_sets:
        return [JobSpec(name=name, **base)]
    names = [test_set["name"] for test_set in test_sets]
    for test_name in names:
        if names.count(test_name) > 1:
            raise ContractError(f"jobs.{name}.test_sets: name {test_name!r} appears twice")
    jobs = []
    for test_set in test_sets:
        test_name = test_set["name"]
        fields = dict(base, test_set=test_name)
        fields["shard_subdir"] = f"{base['shard_subdir']}/{test_name}" if base.get("shard_subdir") else test_name
        fields["provider_config"] = deep_merge(base.get("provider_config") or {}, test_set.get("provider_config") or {})
        fields["params"] = {**(base.get("params") or {}), **(test_set.get("params") or {})}
        for key in ("items", "inputs"):
            if test_set.get(key) is not None:
                fields[key] = test_set[key]
        jobs.append(JobSpec(name=name, **fields))
    return jobs


def check_paths(job: JobSpec, protected_dirs: Iterable[Any]) -> None:
    """Refuse output paths that Snakemake cannot use or that write outside the job's ``output_dir``:
    wildcard braces, a ``shard_subdir`` that escapes ``output_dir``, the filesystem root, and any
    place inside a protected directory (the workflow's ``config/``)."""
    where = f"jobs.{job.name}"
    for key in ("output_dir", "shard_subdir"):
        value = getattr(job, key)
        if "{" in value or "}" in value:
            raise ContractError(f"{where}.{key} {value!r} has braces, which Snakemake reads as wildcards; rename it")
    subdir = PurePosixPath(job.shard_subdir)
    if job.shard_subdir and (subdir.is_absolute() or ".." in subdir.parts or os.path.normpath(subdir) == "."):
        raise ContractError(
            f"{where}.shard_subdir {job.shard_subdir!r} must be a relative path inside output_dir (no '..', not absolute)"
        )
    output_dir = Path(job.output_dir).resolve()
    if output_dir == Path(output_dir.anchor):
        raise ContractError(f"{where}.output_dir {job.output_dir!r} is the filesystem root; name a directory for results")
    for directory in (Path(d).resolve() for d in protected_dirs):
        if output_dir == directory or directory in output_dir.parents:
            raise ContractError(
                f"{where}.output_dir {job.output_dir!r} is inside the config directory {directory}; "
                "write results elsewhere (e.g. results/<job>)"
            )


def jobs_from_config(config: Mapping[str, Any], protected_dirs: Iterable[Any] = ("config",)) -> Dict[str, JobSpec]:
    """Check the config and build every job description, keyed by its root directory (posix).

    No job may write inside ``protected_dirs`` (relative to the working directory)
    or share its root with another.
    """
    check_config(config)
    jobs: Dict[str, JobSpec] = {}
    protected_dirs = list(protected_dirs)
    for job_name, settings in config["jobs"].items():
        for job in jobs_of(job_name, settings):
            check_paths(job, protected_dirs)
            root = job.root.as_posix()
            if root in jobs:
                raise ContractError(
                    f"jobs.{job_name}: output_dir/shard_subdir {root!r} is also used by job "
                    f"{jobs[root].name!r}; give each job its own directory"
                )
            jobs[root] = job
    return jobs


def jobs_named(jobs: Iterable[JobSpec], name: str) -> List[JobSpec]:
    """The jobs ``name`` names: a job (every test set of it), or one test set as ``job/test_set``."""
    return [job for job in jobs if name in (job.name, job.label)]


def job_from_config(config: Mapping[str, Any], name: str) -> JobSpec:
    """The job ``name`` (a job with test sets needs ``name/test_set``)."""
    jobs = list(jobs_from_config(config).values())
    matches = jobs_named(jobs, name)
    if len(matches) != 1:
        names = sorted(job.label for job in jobs)
        problem = "names several test sets" if matches else "is not in the config"
        raise ContractError(f"job {name!r} {problem}; jobs are {names}")
    return matches[0]


def shard_resource(job: JobSpec, name: str, attempt: int = 1) -> Any:
    """Per-shard resource ``name`` of ``job`` (defaults filled in); ``mem_mb`` and ``runtime``
    grow by ``attempt_scale`` on each retry of a failed shard."""
    resources = {**DEFAULT_RESOURCES, **job.resources}
    value = resources[name]
    if name in GROWING_RESOURCES:
        value = int(round(value * resources["attempt_scale"] ** (attempt - 1)))
    return value


@contextmanager
def exit_on_contract_error() -> Iterator[None]:
    """Snakefile guard: a :class:`ContractError` stops ``snakemake`` with its one line, no traceback."""
    try:
        yield
    except ContractError as exc:
        raise SystemExit(f"espnet3-rules: error: {exc}") from None


class ProviderStandIn:
    """Stands in for the provider when a runner is constructed at dry-run: the job's ``config``
    and ``params``, and nothing built."""

    def __init__(self, job: JobSpec):
        """Hold the job's provider config (a ``DictConfig``) and params."""
        self.config = provider_config(job)
        self.params = dict(job.params)


def check_runner_options(job: JobSpec) -> None:
    """Construct the runner around a :class:`ProviderStandIn`, so that a runner that checks its
    options in ``__init__`` (``InferenceRunner``: ``output_fn``, artifacts, ``input_key``) fails
    at dry-run. Only its :class:`ContractError` counts: anything else the stand-in may cause is
    left to the plan rule, which constructs the real provider."""
    try:
        runner_class(job)(ProviderStandIn(job), **runner_arguments(job))
    except ContractError as exc:
        raise ContractError(f"jobs.{job.name}: {exc}") from None
    except Exception:  # noqa: BLE001 - see docstring
        pass


def describe_job(job: JobSpec) -> str:
    """One dry-run line: contract checks that build nothing (classes, runner options), then the
    shard plan where the item count is known without building anything (``items:`` or a static
    ``build_dataset``)."""
    where = f"job {job.name} ({job.root.as_posix()})"
    check_classes(job)
    check_runner_options(job)
    try:
        n_items = count_items_without_building(job)
    except OSError as exc:
        return f"{where}: {job.n_shards} shards; items counted when plan runs (dataset not ready: {exc})"
    if n_items is None:
        return f"{where}: {job.n_shards} shards; items counted when plan runs (set items: N to see them here)"
    try:
        return f"{where}: {make_plan(job, range(n_items)).summary()}"
    except ContractError as exc:
        raise ContractError(f"jobs.{job.name}: {exc}") from None
