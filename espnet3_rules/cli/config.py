"""Jobs from the YAML config: one *unit* (manifest + shards + merge) per job.

The Snakefile and the CLI both go through here, so a job means the same thing
to ``snakemake`` and to ``python -m espnet3_rules``.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from espnet3_rules.engine.contracts import ContractError, check_setup_fn, import_object
from espnet3_rules.engine.plan import ShardPlan

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
    test_set: Optional[str] = None
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
        for key in ("resources", "inputs"):
            data.pop(key)
        return data

    def to_json(self) -> str:
        """:meth:`plan_inputs` as JSON (what the plan rule passes to ``plan --unit-json``)."""
        return json.dumps(self.plan_inputs(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Unit":
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))

    def shard_group(self) -> Optional[str]:
        """Snakemake group of this unit's shards (``resources.group``), or ``None``."""
        return self.shard_resource("group") or None

    def shard_resource(self, name: str, attempt: int = 1) -> Any:
        """Per-shard resource ``name`` (defaults filled in); ``mem_mb`` and ``runtime``
        grow by ``attempt_scale`` on each retry of a failed shard."""
        resources = {**DEFAULT_RESOURCES, **self.resources}
        value = resources[name]
        if name in GROWING_RESOURCES:
            value = int(round(value * resources["attempt_scale"] ** (attempt - 1)))
        return value


def check_config(config: Mapping[str, Any], schema_path: Any, source: str = "config") -> None:
    """Validate ``config`` against the JSON schema; the first error as one line naming the key."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(dict(config)))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ContractError(f"{source}: {where}: {error.message}")


TEST_SET_KEYS = ("provider_config", "params", "items", "inputs")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated by ``override``, recursing into nested mappings."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


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


def units_of_job(name: str, job: Mapping[str, Any]) -> List[Unit]:
    """The units of one job: itself, or one per entry of its ``test_sets``.

    A test set shares the job's settings, with its own ``shard_subdir``
    (``<shard_subdir>/<test set>``) and its own ``provider_config`` (merged
    over the job's), ``params``, ``items`` and ``inputs``.
    """
    check_job_keys(name, job, extra=("test_sets", "measure"))
    base = {k: v for k, v in job.items() if v is not None and k not in ("test_sets", "measure")}
    test_sets = job.get("test_sets") or []
    if not test_sets:
        return [Unit(job=name, **base)]
    names = [test_set["name"] for test_set in test_sets]
    for test_name in names:
        if not test_name or names.count(test_name) > 1:
            raise ContractError(f"jobs.{name}.test_sets: name {test_name!r} is empty or appears twice")
    units = []
    for test_set in test_sets:
        test_name = test_set["name"]
        fields = dict(base, test_set=test_name)
        fields["shard_subdir"] = f"{base['shard_subdir']}/{test_name}" if base.get("shard_subdir") else test_name
        fields["provider_config"] = deep_merge(base.get("provider_config") or {}, test_set.get("provider_config") or {})
        fields["params"] = {**(base.get("params") or {}), **(test_set.get("params") or {})}
        for key in ("items", "inputs"):
            if test_set.get(key) is not None:
                fields[key] = test_set[key]
        units.append(Unit(job=name, **fields))
    return units


@contextmanager
def exit_on_contract_error() -> Iterator[None]:
    """Snakefile guard: a :class:`ContractError` stops ``snakemake`` with its one line, no traceback."""
    try:
        yield
    except ContractError as exc:
        raise SystemExit(f"espnet3-rules: error: {exc}") from None


def check_output_dir(unit: Unit, protected_dirs: Iterable[Any]) -> None:
    """Refuse an ``output_dir`` inside a protected directory (the workflow's ``config/``)."""
    output_dir = Path(unit.output_dir).resolve()
    for directory in (Path(d).resolve() for d in protected_dirs):
        if output_dir == directory or directory in output_dir.parents:
            raise ContractError(
                f"jobs.{unit.job}.output_dir {unit.output_dir!r} is inside the config directory {directory}; "
                "write results elsewhere (e.g. results/<job>)"
            )


def units_from_config(config: Mapping[str, Any], protected_dirs: Iterable[Any] = ("config",)) -> Dict[str, Unit]:
    """Build every unit of a (schema-validated) config, keyed by its root directory.

    No unit may write inside ``protected_dirs`` (relative to the working directory).
    """
    jobs = config.get("jobs") if isinstance(config, Mapping) else None
    if jobs is not None and not isinstance(jobs, Mapping):
        raise ContractError(f"config 'jobs' must be a mapping of job name -> settings, got {type(jobs).__name__}")
    units: Dict[str, Unit] = {}
    protected_dirs = list(protected_dirs)
    for job_name, job in (jobs or {}).items():
        for unit in units_of_job(job_name, job):
            check_output_dir(unit, protected_dirs)
            if unit.root in units:
                raise ContractError(
                    f"jobs.{job_name}: output_dir/shard_subdir {unit.root!r} is also used by job "
                    f"{units[unit.root].job!r}; give each job its own directory"
                )
            units[unit.root] = unit
    if not units:
        raise ContractError("config has no jobs: add at least one entry under 'jobs'")
    return units


def measure_specs(config: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per job output_dir (holding ``metrics.json``): the job's ``measure`` section and its units."""
    specs: Dict[str, Dict[str, Any]] = {}
    for job_name, job in (config.get("jobs") or {}).items():
        if not job.get("measure"):
            continue
        units = units_of_job(job_name, job)
        if any(unit.test_set is None for unit in units) and not job.get("shard_subdir"):
            raise ContractError(f"jobs.{job_name}.measure needs test_sets (or a shard_subdir) to name the test set")
        metrics_dir = Path(job["output_dir"]).as_posix()
        if metrics_dir in specs:
            raise ContractError(
                f"jobs.{job_name}.measure: {metrics_dir}/metrics.json is also written by job {specs[metrics_dir]['job']!r}"
            )
        specs[metrics_dir] = {
            "job": job_name,
            "output": f"{metrics_dir}/metrics.json",
            "measure": dict(job["measure"]),
            "units": [unit.plan_inputs() for unit in units],
        }
    return specs


def measure_job(spec: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Score every test set of one job (a :func:`measure_specs` entry) into its ``metrics.json``."""
    from espnet3_rules.metrics import measure, provider_dataset_source

    units = [Unit(**fields) for fields in spec["units"]]
    section = spec["measure"]
    inference_dir = Path(units[0].root).parent
    return measure(
        section["metrics"],
        inference_dir,
        test_sets=[Path(unit.root).name for unit in units],
        datasets={Path(unit.root).name: provider_dataset_source(build_provider(unit)) for unit in units},
        idx_key=section.get("idx_key") or "utt_id",
        dataset_artifacts=section.get("dataset_artifacts"),
        output_path=spec["output"],
    )


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
    from espnet3_rules.metrics import provider_dataset_source

    if unit.items is not None:
        return unit.items
    try:
        dataset = provider_dataset_source(provider).build()
    except (OSError, ContractError):
        raise  # OSError: a dataset file may be made by an upstream rule (see describe_unit)
    except Exception as exc:  # noqa: BLE001 - user code: one line naming the provider
        hook = "build_dataset" if callable(getattr(type(provider), "build_dataset", None)) else "build_env_local"
        raise ContractError(f"{type(provider).__name__}.{hook}() raised {type(exc).__name__}: {exc}") from exc
    try:
        return len(dataset)
    except TypeError:
        raise ContractError(f"the dataset ({type(dataset).__name__}) has no len(); set items: N in the config") from None


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


def describe_unit(unit: Unit) -> str:
    """One dry-run line: contract-checked plan summary of a unit.

    Contract errors propagate; a dataset that does not exist yet (made by an
    upstream rule) is reported instead of counted.
    """
    try:
        plan = plan_unit(unit)
    except OSError as exc:
        return f"job {unit.job} ({unit.root}): {unit.n_shards} shards; items counted when plan runs (dataset not ready: {exc})"
    return f"job {unit.job} ({unit.root}): {plan.summary()}"
