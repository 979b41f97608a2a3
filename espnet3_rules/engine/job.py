"""The one description of a sharded job, and the user objects it names.

A :class:`JobSpec` is what the config says about one job (or one test set of it),
exactly as configured: the Snakefile plans from it, the CLI passes it, the Python
API records it from the live objects, ``manifest.json`` embeds it, and a shard or
merge process rebuilds the provider and runner from it. Its result fields and the
items make the fingerprint, so every option of any runner reaches every shard and a
change of one reruns that job's shards.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from espnet3_rules.engine.contracts import (
    ContractError,
    check_forward_env,
    check_runner_class,
    env_dataset,
    import_object,
)

#: Fields that determine results besides the items: a change of one makes finished shards stale.
RESULT_FIELDS = ("runner", "provider", "provider_config", "params", "runner_kwargs", "batch_size")


def shard_root(output_dir: Any, shard_subdir: str = "") -> Path:
    """``output_dir/shard_subdir``: where a job's ``manifest.json``, ``split.N/`` and merged outputs live."""
    return Path(output_dir) / shard_subdir if shard_subdir else Path(output_dir)


def job_label(name: str, test_set: Optional[str]) -> str:
    """How the CLI and the report name a job: ``name``, or ``name/test_set`` for one of its test sets."""
    return name if test_set is None else f"{name}/{test_set}"


@dataclass
class JobSpec:
    """One sharded run: its manifest, its ``split.N`` shards and its merge.

    Args:
        name: Job name (``jobs.<name>`` in the config), used in messages.
        runner: Import path of the runner class, as the config names it.
        provider: Import path of the provider class, as the config names it.
        output_dir: Root of the job's outputs.
        shard_subdir: Sub-path of ``output_dir`` holding ``manifest.json`` and ``split.N/``.
        n_shards: Number of shards.
        batch_size: ``forward`` gets lists of this many indices (``None``: one index).
        provider_config: The provider's config (an OmegaConf ``DictConfig`` at run time).
        params: Provider params (extra env entries).
        runner_kwargs: Extra runner constructor arguments; also env defaults of the hooks.
        items: Number of items (indices ``0..items-1``); ``None``: ``len(dataset)``.
        test_set: Test-set name when the job came from ``test_sets``.
        inputs: Files the dataset is read from (Snakemake inputs of the plan and shards).
        resources: Per-shard resources (``threads``, ``mem_mb``, ...); they never change results.
    """

    name: str
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
    def root(self) -> Path:
        """See :func:`shard_root`."""
        return shard_root(self.output_dir, self.shard_subdir)

    @property
    def label(self) -> str:
        """See :func:`job_label`."""
        return job_label(self.name, self.test_set)

    def result_fields(self) -> Dict[str, Any]:
        """What determines results besides the items (hashed into the fingerprint)."""
        return {key: getattr(self, key) for key in RESULT_FIELDS}

    def to_dict(self) -> Dict[str, Any]:
        """Every field, as embedded in ``manifest.json``."""
        return asdict(self)

    def to_json(self) -> str:
        """:meth:`to_dict` without ``resources`` as canonical JSON: what the plan rule passes and
        what Snakemake compares (a change re-plans the job; a change of resources does not)."""
        data = self.to_dict()
        data.pop("resources")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobSpec":
        """Inverse of :meth:`to_dict` (and of :meth:`to_json`)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContractError(f"job description has unknown field(s) {unknown}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


# ------------------------------------------------------------------ classes
def provider_class(job: JobSpec) -> type:
    """Import the provider class and check it builds envs."""
    cls = import_object(job.provider, f"jobs.{job.name}.provider")
    if not isinstance(cls, type) or not callable(getattr(cls, "build_env_local", None)):
        raise ContractError(
            f"jobs.{job.name}.provider {job.provider!r} is not an EnvironmentProvider class (no build_env_local)"
        )
    return cls


def runner_class(job: JobSpec) -> type:
    """Import the runner class and check its ``forward``."""
    cls = import_object(job.runner, f"jobs.{job.name}.runner")
    if not isinstance(cls, type) or not hasattr(cls, "forward"):
        raise ContractError(f"jobs.{job.name}.runner {job.runner!r} is not a BaseRunner class (no forward)")
    check_runner_class(cls)
    return cls


def takes_params(provider_cls: type) -> bool:
    """Whether the provider's constructor accepts ``params`` (ESPnet3's InferenceProvider does)."""
    return "params" in inspect.signature(provider_cls).parameters


def runner_arguments(job: JobSpec) -> Dict[str, Any]:
    """Keyword arguments the runner is constructed with, besides the provider."""
    return {
        "batch_size": job.batch_size,
        "output_dir": job.output_dir,
        "shard_subdir": job.shard_subdir,
        **job.runner_kwargs,
    }


def declared_env_keys(job: JobSpec, provider_cls: type) -> Optional[List[str]]:
    """Env keys the shards will see, if the provider declares its own without building anything.

    A provider may offer ``declared_env_keys(params)`` as a classmethod (``InferenceProvider``
    does); ``None`` means unknown, and ``forward``'s names are then checked when a shard builds its env.
    """
    declare = getattr(provider_cls, "declared_env_keys", None)
    keys = declare(job.params) if callable(declare) else None
    if keys is None:
        return None
    return sorted({*keys, *shard_env_defaults(job)})


def check_classes(job: JobSpec) -> None:
    """Everything checkable from the classes alone (no provider or runner is built): imports,
    ``forward``, constructor arguments, ``forward``'s env names where the provider declares them."""
    provider_cls, runner_cls = provider_class(job), runner_class(job)
    if job.params and not takes_params(provider_cls):
        raise ContractError(
            f"jobs.{job.name}.params given, but {provider_cls.__name__}.__init__ takes no params argument"
        )
    try:
        inspect.signature(runner_cls.__init__).bind(None, None, **runner_arguments(job))  # self, provider
    except TypeError as exc:
        raise ContractError(f"jobs.{job.name}.runner_kwargs do not fit {runner_cls.__name__}: {exc}") from None
    keys = declared_env_keys(job, provider_cls)
    if keys is not None:
        check_forward_env(runner_cls, keys, provider_cls.__name__)


# ------------------------------------------------------------------ objects
def provider_config(job: JobSpec) -> Any:
    """The provider ``config``: an OmegaConf ``DictConfig``, as ESPnet3 providers expect."""
    from omegaconf import OmegaConf

    return OmegaConf.create(dict(job.provider_config))


def build_provider(job: JobSpec) -> Any:
    """Construct the job's provider (``params`` passed where its constructor takes them)."""
    cls = provider_class(job)
    if takes_params(cls):
        return cls(provider_config(job), params=dict(job.params))
    if job.params:
        raise ContractError(f"jobs.{job.name}.params given, but {cls.__name__}.__init__ takes no params argument")
    return cls(provider_config(job))


def build_runner(job: JobSpec, provider: Any = None) -> Any:
    """Construct the job's runner around ``provider`` (built from the job if not given)."""
    cls = runner_class(job)
    provider = build_provider(job) if provider is None else provider
    try:
        return cls(provider, **runner_arguments(job))
    except TypeError as exc:
        raise ContractError(f"jobs.{job.name}.runner_kwargs do not fit {cls.__name__}: {exc}") from exc


def shard_env_defaults(job: JobSpec) -> Dict[str, Any]:
    """Env entries every shard gets unless the provider's env has them: ``output_dir``,
    ``shard_subdir`` (as ESPnet3 sets them) and each runner option by name."""
    defaults: Dict[str, Any] = {"output_dir": str(job.output_dir)}
    if job.shard_subdir:
        defaults["shard_subdir"] = job.shard_subdir
    for key, value in job.runner_kwargs.items():
        defaults.setdefault(key, value)
    return defaults


def shard_env(job: JobSpec, provider_env: Mapping[str, Any]) -> Dict[str, Any]:
    """The env the hooks of a shard see: the provider's, then :func:`shard_env_defaults`."""
    env = dict(provider_env)
    for key, value in shard_env_defaults(job).items():
        env.setdefault(key, value)
    return env


# ------------------------------------------------------------------ items
def static_dataset_builder(provider_cls: type) -> Optional[Callable[[Any], Any]]:
    """The provider's dataset-only builder (a concrete static or class ``build_dataset(config)``), if any."""
    build = inspect.getattr_static(provider_cls, "build_dataset", None)
    if not isinstance(build, (staticmethod, classmethod)) or getattr(build.__func__, "__isabstractmethod__", False):
        return None
    return getattr(provider_cls, "build_dataset")


def build_dataset(provider: Any) -> Any:
    """The provider's dataset: its ``build_dataset(config)`` alone where it has one (no model is
    built), else ``build_env_local()["dataset"]``."""
    build = static_dataset_builder(type(provider))
    if build is not None:
        return build(getattr(provider, "config", None))
    return env_dataset(provider, provider.build_env_local())


def measured_length(build: Callable[[], Any], owner: str, hook: str) -> int:
    """``len(build())``: an error of the user's builder (or a dataset without ``len``) as one line
    naming ``owner.hook``; ``OSError`` passes through (a dataset file may be made by an upstream rule)."""
    try:
        dataset = build()
    except (OSError, ContractError):
        raise
    except Exception as exc:  # noqa: BLE001 - user code
        raise ContractError(f"{owner}.{hook}() raised {type(exc).__name__}: {exc}") from exc
    try:
        return len(dataset)
    except TypeError:
        raise ContractError(
            f"the dataset ({type(dataset).__name__}, from {owner}.{hook}) has no len(); set items: N in the config"
        ) from None


def count_items(job: JobSpec, provider: Any) -> int:
    """Number of items: ``items`` from the config, else ``len`` of the provider's dataset."""
    if job.items is not None:
        return job.items
    hook = "build_dataset" if static_dataset_builder(type(provider)) else "build_env_local"
    return measured_length(lambda: build_dataset(provider), type(provider).__name__, hook)


def count_items_without_building(job: JobSpec) -> Optional[int]:
    """Number of items known without constructing the provider or building a model: ``items``,
    else the length of a static ``build_dataset`` called with the job's config; ``None`` otherwise."""
    if job.items is not None:
        return job.items
    provider_cls = provider_class(job)
    build = static_dataset_builder(provider_cls)
    if build is None:
        return None
    config = dataset_config(job, provider_cls)
    return measured_length(lambda: build(config), provider_cls.__name__, "build_dataset")


def dataset_config(job: JobSpec, provider_cls: type) -> Any:
    """The config a provider of ``provider_cls`` built from ``job`` would hand its ``build_dataset``:
    the job's, with ``params`` merged where the class says so (its ``config_with_params``; the
    systems-level InferenceProvider merges, the parallel one does not); as given for other classes."""
    merge = getattr(provider_cls, "config_with_params", None)
    config = provider_config(job)
    return merge(config, dict(job.params)) if callable(merge) else config
