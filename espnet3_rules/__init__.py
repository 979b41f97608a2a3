"""ESPnet3-style providers and runners for sharded, resumable jobs orchestrated by Snakemake.

The public names load on first use (PEP 562), so that ``python -m espnet3_rules run-shard``,
the fork server's client, imports only what it needs before it hands the shard over.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BaseRunner": "espnet3_rules.parallel.base_runner",
    "ContractError": "espnet3_rules.engine.contracts",
    "EnvironmentProvider": "espnet3_rules.parallel.env_provider",
    "InferenceProvider": "espnet3_rules.parallel.inference_provider",
    "InferenceRunner": "espnet3_rules.systems.base.inference_runner",
    "concatenate_shard_files": "espnet3_rules.parallel.base_runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (``from espnet3_rules import X`` too)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'espnet3_rules' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    """The module's names, the lazily loaded public ones included."""
    return sorted(set(globals()) | set(__all__))
