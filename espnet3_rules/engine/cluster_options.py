"""ESPnet3's cluster ``options`` (Dask ``LocalCluster`` / dask-jobqueue keys) as shard resources.

``set_parallel({"env": ..., "options": {...}})`` and the ``parallel:`` section of an ESPnet3
recipe name a Dask cluster. Here every shard is one Snakemake job, so the options that size
a worker become the shard's ``resources`` (the keys of
:data:`espnet3_rules.cli.config.DEFAULT_RESOURCES`): :func:`shard_resources` is the one place
that maps them. Keys that only tune Dask itself are ignored with one warning; any other key
is refused, naming it and the supported ones: nothing is guessed.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Tuple

from espnet3_rules.engine.contracts import ContractError

__all__ = ["IGNORED_KEYS", "SUPPORTED_ENVS", "parse_memory_mb", "parse_walltime_minutes", "shard_resources"]

LOG = logging.getLogger(__name__)

#: Dask-only keys that do not change what a shard computes or asks for: ignored (one warning).
IGNORED_KEYS = frozenset({
    "processes", "interface", "log_directory", "death_timeout", "local_directory", "worker_extra_args",
    "python", "shebang", "dashboard_address", "scheduler_options", "silence_logs", "name", "nanny",
    "protocol", "host", "scheduler_port", "worker_dashboard_address", "asynchronous",
})

#: The envs whose options map here, and the option keys each supports.
SUPPORTED_ENVS: Dict[str, Tuple[str, ...]] = {
    "local": ("threads_per_worker", "memory_limit"),
    "local_gpu": ("threads_per_worker", "memory_limit"),
    "slurm": ("queue", "partition", "account", "cores", "job_cpu", "memory", "job_mem", "walltime",
              "job_extra_directives", "job_extra"),
}

_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SLURM_MEM_UNITS = {"": 1, "k": 2**-10, "m": 1, "g": 2**10, "t": 2**20}  # sbatch --mem: MiB by default


def _amount(value: Any, key: str) -> Tuple[float, str]:
    """``(number, lower-case unit)`` of ``"16GB"``, ``"4 GiB"``, ``2000`` (no unit)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ContractError(f"parallel.options.{key}: expected a size like '16GB', got {value!r}")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if match is None:
        raise ContractError(f"parallel.options.{key}: cannot read {value!r} as a size like '16GB'")
    return float(match.group(1)), match.group(2).lower()


def parse_memory_mb(value: Any, key: str = "memory") -> int:
    """A Dask memory size (``"16GB"``, ``"4GiB"``, ``"2000MB"``; a bare number is bytes, as in Dask)
    in MiB (what ``mem_mb`` asks SLURM for), rounded up."""
    number, unit = _amount(value, key)
    if unit not in _BYTE_UNITS:
        raise ContractError(f"parallel.options.{key}: unknown size unit in {value!r} (use e.g. 16GB, 4GiB, 2000MB)")
    return max(1, math.ceil(number * _BYTE_UNITS[unit] / 2**20))


def _slurm_memory_mb(value: str, key: str) -> int:
    """An ``sbatch --mem`` value (``16G``, ``2000``: MiB by default) in MiB."""
    number, unit = _amount(value, key)
    if unit not in _SLURM_MEM_UNITS:
        raise ContractError(f"parallel.options.{key}: unknown --mem unit in {value!r} (use K, M, G or T)")
    return max(1, math.ceil(number * _SLURM_MEM_UNITS[unit]))


def parse_walltime_minutes(value: Any, key: str = "walltime") -> int:
    """A SLURM time (``"01:00:00"``, ``"1-00:00:00"``, ``"30:00"``, ``"1-12"``, ``"90"`` minutes) in minutes, rounded up."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if isinstance(value, bool) or match is None:
        raise ContractError(
            f"parallel.options.{key}: cannot read {value!r} as a time like '01:00:00', '1-00:00:00' or '30:00'"
        )
    days, first, second, third = match.groups()
    fields = [int(f) for f in (first, second, third) if f is not None]
    if days is not None:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = (fields + [0, 0])[:3]
    elif len(fields) == 3:
        hours, minutes, seconds = fields
    else:  # minutes[:seconds]
        hours, (minutes, seconds) = 0, (fields + [0])[:2]
    total_s = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    return max(1, math.ceil(total_s / 60))


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
        raise ContractError(f"parallel.options.{key}: expected a positive whole number, got {value!r}")
    return int(value)


def _gpu_request(value: str, key: str) -> Dict[str, Any]:
    """``gpu:2`` / ``gpu:a100:2`` (``--gres``) or ``2`` / ``a100:2`` (``--gpus``) as ``gpu`` and ``gpu_model``."""
    parts = value.split(":")
    if parts[0] == "gpu":
        parts = parts[1:]
    if not parts or len(parts) > 2 or not parts[-1].isdigit():
        raise ContractError(f"parallel.options.{key}: cannot read a GPU count from {value!r} (e.g. --gres=gpu:1)")
    request: Dict[str, Any] = {"gpu": int(parts[-1])}
    if len(parts) == 2:
        request["gpu_model"] = parts[0]
    return request


def _gres(value: str, key: str) -> Dict[str, Any]:
    if not value.startswith("gpu"):
        raise ContractError(
            f"parallel.options.{key}: --gres={value} is not a GPU request; the SLURM executor plugin sets "
            "--gres itself and refuses it in slurm_extra"
        )
    return _gpu_request(value, key)


#: sbatch options of ``job_extra_directives`` that the SLURM plugin manages: each becomes a resource.
_DIRECTIVES: Dict[str, Callable[[str, str], Dict[str, Any]]] = {
    "--gres": _gres,
    "--gpus": _gpu_request,
    "--partition": lambda v, k: {"slurm_partition": v},
    "-p": lambda v, k: {"slurm_partition": v},
    "--account": lambda v, k: {"slurm_account": v},
    "-A": lambda v, k: {"slurm_account": v},
    "--mem": lambda v, k: {"mem_mb": _slurm_memory_mb(v, k)},
    "--time": lambda v, k: {"runtime": parse_walltime_minutes(v, k)},
    "-t": lambda v, k: {"runtime": parse_walltime_minutes(v, k)},
    "--cpus-per-task": lambda v, k: {"threads": _positive_int(v, k)},
    "-c": lambda v, k: {"threads": _positive_int(v, k)},
}

#: Other sbatch options the plugin sets itself (it refuses them in slurm_extra).
_PLUGIN_OWNED = ("--job-name", "-J", "--output", "-o", "--error", "-e", "--export", "--comment", "--workdir",
                 "--chdir", "-D", "--mem-per-cpu", "--ntasks", "-n", "--ntasks-per-gpu", "--cpus-per-gpu",
                 "--constraint", "-C", "--qos", "--nodes", "-N", "--clusters", "--parsable")


def _directive(text: Any, key: str) -> Tuple[str, str, str]:
    """``(option, value, directive)`` of ``--x=y``, ``--x y`` or ``-x y``, optionally after ``#SBATCH``."""
    body = re.sub(r"^#SBATCH\s+", "", text.strip()) if isinstance(text, str) else ""
    match = re.fullmatch(r"(--?[A-Za-z][\w-]*)(?:[=\s]\s*(.*))?", body)
    if match is None:
        raise ContractError(f"parallel.options.{key}: each directive is a string like '--gres=gpu:1', got {text!r}")
    return match.group(1), (match.group(2) or "").strip(), body


def _directives(values: Any, key: str) -> Dict[str, Any]:
    """``job_extra_directives``: managed options as resources, the rest joined into ``slurm_extra``."""
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ContractError(f"parallel.options.{key}: expected a list of strings like ['--gres=gpu:1'], got {values!r}")
    resources: Dict[str, Any] = {}
    extra: List[str] = []
    for text in values:
        option, value, directive = _directive(text, key)
        if option in _DIRECTIVES:
            _update(resources, _DIRECTIVES[option](value, key), f"{key} {text!r}")
        elif option in _PLUGIN_OWNED:
            raise ContractError(
                f"parallel.options.{key}: {text!r}: the SLURM executor plugin sets {option} itself and refuses it "
                "in slurm_extra; drop it"
            )
        else:
            extra.append(directive)
    if extra:
        resources["slurm_extra"] = " ".join(extra)
    return resources


def _update(resources: Dict[str, Any], new: Mapping[str, Any], where: str) -> None:
    """Add ``new`` to ``resources``; a resource set twice to different values is refused."""
    for name, value in new.items():
        if name in resources and resources[name] != value:
            raise ContractError(
                f"parallel.options: {where} sets {name}={value!r}, already {resources[name]!r} from another option"
            )
        resources[name] = value


#: Option key -> its resources.
_KEYS: Dict[str, Callable[[Any, str], Dict[str, Any]]] = {
    "queue": lambda v, k: {"slurm_partition": str(v)},
    "partition": lambda v, k: {"slurm_partition": str(v)},
    "account": lambda v, k: {"slurm_account": str(v)},
    "cores": lambda v, k: {"threads": _positive_int(v, k)},
    "job_cpu": lambda v, k: {"threads": _positive_int(v, k)},
    "threads_per_worker": lambda v, k: {"threads": _positive_int(v, k)},
    "memory": lambda v, k: {"mem_mb": parse_memory_mb(v, k)},
    "job_mem": lambda v, k: {"mem_mb": parse_memory_mb(v, k)},
    "memory_limit": lambda v, k: {"mem_mb": parse_memory_mb(v, k)},
    "walltime": lambda v, k: {"runtime": parse_walltime_minutes(v, k)},
    "job_extra_directives": _directives,
    "job_extra": _directives,
}


def shard_resources(env: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """The shard ``resources`` that ESPnet3's cluster ``options`` for ``env`` ask for.

    ``slurm``: ``queue``/``partition`` -> ``slurm_partition``, ``account`` -> ``slurm_account``,
    ``cores`` (``job_cpu``) -> ``threads``, ``memory`` (``job_mem``; Dask sizes such as ``"16GB"``)
    -> ``mem_mb`` (MiB), ``walltime`` -> ``runtime`` (minutes), ``job_extra_directives`` -> ``gpu`` /
    ``gpu_model`` for ``--gres=gpu:N`` and ``--gpus=N``, the resource of ``--mem``, ``--time``,
    ``--partition``, ``--account``, ``--cpus-per-task``, and ``slurm_extra`` for the rest.
    ``local`` / ``local_gpu``: ``threads_per_worker`` -> ``threads``, ``memory_limit`` -> ``mem_mb``;
    ``local_gpu`` also gives every shard one GPU (``gpu: 1``).

    Args:
        env: The parallel config's ``env`` (``local``, ``local_gpu`` or ``slurm``).
        options: Its ``options``.

    Returns:
        Only the resources the options set (and ``gpu`` for ``local_gpu``).

    Raises:
        ContractError: An env without option mapping, an unsupported key (named, with the
            supported ones), a value that cannot be read, or a resource set twice differently.
    """
    if env not in SUPPORTED_ENVS:
        raise ContractError(f"parallel.env {env!r} has no cluster options here; use one of {sorted(SUPPORTED_ENVS)}")
    options = dict(options or {})
    supported = SUPPORTED_ENVS[env]
    unknown = sorted(k for k in options if k not in supported and k not in IGNORED_KEYS)
    if unknown:
        raise ContractError(
            f"parallel.options {unknown} not supported for env {env!r}; supported: {list(supported)} "
            f"(ignored: {sorted(IGNORED_KEYS)})"
        )
    ignored = sorted(k for k in options if k in IGNORED_KEYS)
    if ignored:
        LOG.warning("parallel.options %s only tune Dask and are ignored here", ignored)
    resources: Dict[str, Any] = {"gpu": 1} if env == "local_gpu" else {}
    for key in supported:
        if key in options:
            _update(resources, _KEYS[key](options[key], key), f"{key}={options[key]!r}")
    return resources
