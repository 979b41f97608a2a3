"""The parallel config of ``runner(indices)``, at ESPnet3's path (``espnet3.parallel.parallel``).

``set_parallel(config)`` / ``get_parallel_config()`` keep one module-level config, as
ESPnet3's do. Without a config, ``runner(indices)`` runs its shards in-process, one after
another. With one (any, even ``{"env": "local", "n_workers": 1}``), it runs the pending
shards as Snakemake jobs of the workflow's ``rule shard`` (:mod:`espnet3_rules.cli.snakemake_run`),
then merges in the calling process. The keys:

- ``env``: ``local`` (the local executor), ``local_gpu`` (the same, one distinct GPU per
  shard; ``n_workers`` above the GPUs found is refused), ``slurm`` (the SLURM executor
  plugin: one sbatch job per shard). ESPnet3's other Dask-jobqueue envs are refused: run
  the workflow with a Snakemake executor plugin instead;
- ``n_workers``: shards at once, and the number of shards of a runner not given ``n_shards``;
- ``options``: the Dask cluster options, as shard resources
  (:func:`espnet3_rules.engine.cluster_options.shard_resources`: ``queue``, ``account``,
  ``cores``, ``memory``, ``walltime``, ``job_extra_directives``, ...);
- ``allow_overwrite_lock``: take over a shard lock whose owner cannot be proven gone
  (another host's, or an unreadable one); see :mod:`espnet3_rules.engine.shard`.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

from espnet3_rules.engine.contracts import ContractTypeError

__all__ = ["get_parallel_config", "set_parallel"]

#: The config set by :func:`set_parallel` (``None`` until then).
parallel_config: Optional[Any] = None


def set_parallel(config: Optional[Any]) -> None:
    """Set the parallel config that ``runner(indices)`` reads.

    Args:
        config: A mapping or OmegaConf ``DictConfig`` (e.g. ``{"env": "local", "n_workers": 4}``),
            stored as a ``DictConfig`` copy with ``options`` defaulting to ``{}``. ``None`` keeps
            the config already set, or sets ESPnet3's default ``{"env": "local", "n_workers": 1}``.
    """
    from omegaconf import OmegaConf

    global parallel_config
    if config is None:
        if parallel_config is not None:
            return
        config = {"env": "local", "n_workers": 1}
    if not (OmegaConf.is_config(config) or isinstance(config, Mapping)):
        raise ContractTypeError(
            f"set_parallel() takes a mapping or DictConfig (or None), got {type(config).__name__}"
        )
    stored = copy.deepcopy(config) if OmegaConf.is_config(config) else OmegaConf.create(dict(config))
    stored.options = dict(stored.get("options") or {})
    parallel_config = stored


def get_parallel_config() -> Optional[Any]:
    """The config set by :func:`set_parallel`, or ``None``."""
    return parallel_config


def n_workers() -> int:
    """Shards of a runner not given ``n_shards``: the config's ``n_workers`` (at least 1), else 1."""
    config = get_parallel_config()
    return max(1, int(getattr(config, "n_workers", 1))) if config is not None else 1


def allow_overwrite_lock() -> bool:
    """Whether the config lets ``runner(indices)`` take over a shard lock of an owner not proven gone."""
    return bool(getattr(get_parallel_config(), "allow_overwrite_lock", False))
