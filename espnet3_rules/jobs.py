"""Jobs from the YAML config: one *unit* (manifest + shards + merge) per job.

The Snakefile and the CLI both go through here, so a job means the same thing
to ``snakemake`` and to ``python -m espnet3_rules``.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .contracts import ContractError, check_setup_fn, env_dataset, import_object
from .plan import ShardPlan

DEFAULT_RESOURCES = {"threads": 1, "mem_mb": 2000, "runtime": 60, "gpu": 0}


@dataclass
class Unit:
    """One sharded run: a job's manifest, its ``split.N`` shards and its merge."""

    job: str
    runner: str
    provider: str
    output_dir: str
    shard_subdir: str = ""
    n_shards: int = 1
    batch_size: Optional[int] = None
    provider_config: Dict[str, Any] = field(default_factory=dict)
    params: Dict[str, Any] = field(default_factory=dict)
    runner_kwargs: Dict[str, Any] = field(default_factory=dict)
    items: Optional[int] = None
    inputs: List[str] = field(default_factory=list)
    resources: Dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> str:
        """``output_dir/shard_subdir`` as Snakemake sees it (no trailing slash)."""
        root = Path(self.output_dir) / self.shard_subdir if self.shard_subdir else Path(self.output_dir)
        return root.as_posix()

    def plan_inputs(self) -> Dict[str, Any]:
        """What the plan depends on (Snakemake ``params``): a change reruns plan and shards."""
        data = asdict(self)
        for key in ("resources", "inputs", "job"):
            data.pop(key)
        return data

    def to_json(self) -> str:
        """The unit as JSON (passed to ``python -m espnet3_rules plan --unit-json``)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Unit":
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))

    def shard_resources(self) -> Dict[str, Any]:
        """Per-shard resources with defaults filled in."""
        return {**DEFAULT_RESOURCES, **self.resources}


def check_job_keys(name: str, job: Any, extra: Sequence[str] = ()) -> None:
    """Refuse a ``jobs.<name>`` entry that is not a mapping or has unknown or missing keys.

    ``extra`` are keys the caller handles itself (not :class:`Unit` fields).
    """
    if not isinstance(job, Mapping):
        raise ContractError(f"jobs.{name} must be a mapping of job settings, got {type(job).__name__}")
    unit_fields = [f for f in fields(Unit) if f.name != "job"]
    known = [f.name for f in unit_fields] + list(extra)
    settings = [k for k, v in job.items() if v is not None]
    unknown = sorted(set(settings) - set(known), key=str)
    if unknown:
        raise ContractError(f"jobs.{name}: unknown key(s) {unknown}; known keys are {known}")
    required = [f.name for f in unit_fields if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in settings]
    if missing:
        raise ContractError(f"jobs.{name}: missing required key(s) {missing}")


def units_from_config(config: Mapping[str, Any]) -> Dict[str, Unit]:
    """Build every unit of a config, keyed by its root directory."""
    jobs = config.get("jobs") if isinstance(config, Mapping) else None
    if jobs is not None and not isinstance(jobs, Mapping):
        raise ContractError(f"config 'jobs' must be a mapping of job name -> settings, got {type(jobs).__name__}")
    units: Dict[str, Unit] = {}
    for job_name, job in (jobs or {}).items():
        check_job_keys(job_name, job)
        unit = Unit(job=job_name, **{k: v for k, v in job.items() if v is not None})
        if unit.root in units:
            raise ContractError(
                f"jobs.{job_name}: output_dir/shard_subdir {unit.root!r} is also used by job "
                f"{units[unit.root].job!r}; give each job its own directory"
            )
        units[unit.root] = unit
    if not units:
        raise ContractError("config has no jobs: add at least one entry under 'jobs'")
    return units


def unit_from_config(config: Mapping[str, Any], job: str) -> Unit:
    """The unit of job ``job``."""
    for unit in units_from_config(config).values():
        if unit.job == job:
            return unit
    names = sorted(u.job for u in units_from_config(config).values())
    raise ContractError(f"no job {job!r} in config; jobs are {names}")


def to_config_object(data: Mapping[str, Any]) -> Any:
    """The provider ``config``: an OmegaConf DictConfig, as ESPnet3 providers expect."""
    from omegaconf import OmegaConf

    return OmegaConf.create(dict(data))


def build_provider(unit: Unit) -> Any:
    """Import and construct the unit's provider (``params`` passed where accepted)."""
    provider_cls = import_object(unit.provider, f"jobs.{unit.job}.provider")
    if not isinstance(provider_cls, type) or not callable(getattr(provider_cls, "build_env_local", None)):
        raise ContractError(
            f"jobs.{unit.job}.provider {unit.provider!r} is not an EnvironmentProvider class (no build_env_local)"
        )
    config = to_config_object(unit.provider_config)
    if "params" in inspect.signature(provider_cls).parameters:
        return provider_cls(config, params=dict(unit.params))
    if unit.params:
        raise ContractError(
            f"jobs.{unit.job}.params given, but {provider_cls.__name__}.__init__ takes no params argument"
        )
    return provider_cls(config)


def build_runner(unit: Unit) -> Any:
    """Import and construct the unit's runner around its provider."""
    runner_cls = import_object(unit.runner, f"jobs.{unit.job}.runner")
    if not isinstance(runner_cls, type) or not hasattr(runner_cls, "forward"):
        raise ContractError(f"jobs.{unit.job}.runner {unit.runner!r} is not a BaseRunner class")
    try:
        return runner_cls(
            build_provider(unit),
            batch_size=unit.batch_size,
            output_dir=unit.output_dir,
            shard_subdir=unit.shard_subdir,
            n_shards=unit.n_shards,
            **unit.runner_kwargs,
        )
    except TypeError as exc:
        raise ContractError(f"jobs.{unit.job}.runner_kwargs do not fit {runner_cls.__name__}: {exc}") from exc


def count_items(unit: Unit, provider: Any) -> int:
    """Number of items: ``items`` from the config, else ``len(dataset)``.

    Builds only the dataset when the provider has a static ``build_dataset``
    (InferenceProvider), so planning never loads the model.
    """
    if unit.items is not None:
        return unit.items
    build_dataset = getattr(type(provider), "build_dataset", None)
    if callable(build_dataset):
        dataset = build_dataset(provider.config)
    else:
        dataset = env_dataset(provider, provider.build_env_local())
    try:
        return len(dataset)
    except TypeError:
        raise ContractError(
            f"the dataset ({type(dataset).__name__}) has no len(); set items: N in the config"
        ) from None


def validate_unit(unit: Unit) -> Any:
    """Class-level contract checks (imports, static forward, declared env names); returns the runner."""
    runner = build_runner(unit)
    runner.validate()
    return runner


def plan_unit(unit: Unit) -> ShardPlan:
    """Full plan-time check and the shard plan of one unit."""
    runner = validate_unit(unit)
    check_setup_fn(runner.provider, runner.provider.build_worker_setup_fn())
    try:
        n_items = count_items(unit, runner.provider)
        return runner.plan(range(n_items))
    except ContractError as exc:
        raise ContractError(f"jobs.{unit.job}: {exc}") from None
