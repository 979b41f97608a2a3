"""Environment providers: build dataset/model/tokenizer once per process.

At ESPnet3's path (``espnet3.parallel.env_provider``) so that an ESPnet3
provider works here by changing only its import line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Mapping, Optional, Set

from espnet3_rules.engine.contracts import ContractTypeError
from espnet3_rules.engine.plan import jsonable


class EnvironmentProvider(ABC):
    """Build and hand out the runtime environment (a dict injected into ``forward``).

    Subclasses implement:

    - ``build_env_local()``: build one env dict on the driver (in-process runs).
    - ``build_worker_setup_fn()``: return a *zero-argument function* that builds the
      env; it runs once per worker process (one Snakemake shard job).

    Args:
        config: Configuration used to build the environment (a mapping; the CLI
            passes an OmegaConf ``DictConfig`` built from the YAML job config).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "EnvironmentProvider":
        """Record the config as given (a plain-data copy), before any subclass changes it."""
        provider = super().__new__(cls)
        # ESPnet3's systems-level InferenceProvider names it ``inference_config``
        config = args[0] if args else kwargs.get("config", kwargs.get("inference_config"))
        provider._given_config = jsonable(config if config is not None else {})
        return provider

    def __init__(self, config: Any = None):
        """Keep the configuration used to build the environment."""
        self.config = config

    @abstractmethod
    def build_env_local(self) -> Dict[str, Any]:
        """Build the environment once on the driver (``runner(indices)`` in-process).

        Returns:
            The env: a dict of name -> object (e.g. ``{"dataset": ..., "model": ...}``).
        """
        raise NotImplementedError

    def build_worker_setup_fn(self) -> Callable[[], Dict[str, Any]]:
        """Return a zero-argument function that builds the env inside a worker.

        It runs once per shard process (one Snakemake job), so the heavy work
        (loading a model) belongs inside it, not here.

        Returns:
            ``setup`` with ``setup()`` -> the env dict. Return the function, not the dict.

        Older ESPnet3 providers name this hook ``make_worker_setup_fn``; such a
        provider keeps working because this default delegates to it.
        """
        legacy = getattr(type(self), "make_worker_setup_fn", None)
        if legacy is None:  # ESPnet3: abstract, so constructing such a provider is a TypeError
            raise ContractTypeError(
                f"{type(self).__name__} must implement build_worker_setup_fn(): shard processes build their env with it"
            )
        return legacy(self)

    @classmethod
    def declared_env_keys(cls, params: Mapping[str, Any]) -> Optional[Set[str]]:
        """Env keys this provider class will return, if known without building anything.

        Not part of ESPnet3's contract (a provider without it works the same): the
        workflow uses it to check ``forward``'s parameter names at ``snakemake -n``.

        Args:
            params: The job's provider params.

        Returns:
            The keys, or ``None`` (the default) for "unknown": the check then runs when a shard builds its env.
        """
        return None
