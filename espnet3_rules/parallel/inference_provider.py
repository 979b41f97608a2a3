"""InferenceProvider: a provider whose env is ``{"dataset", "model", **params}``.

At ESPnet3's path (``espnet3.parallel.inference_provider``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable, Dict, Mapping, Optional, Set

from espnet3_rules.parallel.env_provider import EnvironmentProvider


class InferenceProvider(EnvironmentProvider):
    """Provider specialised for dataset/model inference.

    Subclasses implement the static builders ``build_dataset(config)`` and
    ``build_model(config)``. ``params`` are extra env entries (device, beam size,
    ``input_key``, ...) and are also merged into ``config`` as ESPnet3 does.

    The local env is built once per provider and cached: ``build_env_local()``
    returns a shallow copy of it, built by the same setup function workers use,
    so local and worker setup stay identical. Unlike ESPnet3 it is built on first
    use rather than in ``__init__``, so planning (which only needs the dataset
    length) never loads the model.
    """

    def __init__(self, config: Any = None, params: Optional[Mapping[str, Any]] = None):
        """Keep ``config`` and ``params``; merge ``params`` into ``config``."""
        super().__init__(config if config is not None else {})
        self.params: Dict[str, Any] = dict(params or {})
        if self.params:
            self.config.update(self.params)
        self._local_env: Optional[Dict[str, Any]] = None

    @staticmethod
    @abstractmethod
    def build_dataset(config: Any) -> Any:
        """Build the dataset.

        Args:
            config: The provider's config (``params`` merged in).

        Returns:
            An indexable dataset with ``len()``. Called alone (without the model)
            to count items at ``snakemake -n`` and in the plan rule.
        """
        raise NotImplementedError

    @staticmethod
    @abstractmethod
    def build_model(config: Any) -> Any:
        """Build the model (load weights, move to device).

        Args:
            config: The provider's config (``params`` merged in).

        Returns:
            The model, the env's ``model``.
        """
        raise NotImplementedError

    def build_worker_setup_fn(self) -> Callable[[], Dict[str, Any]]:
        """Return a setup function building ``{"dataset", "model", **params}``."""
        config, params, cls = self.config, dict(self.params), type(self)

        def setup() -> Dict[str, Any]:
            env = {"dataset": cls.build_dataset(config), "model": cls.build_model(config)}
            env.update(params)
            return env

        return setup

    def build_env_local(self) -> Dict[str, Any]:
        """Build the env once (cached) and return a shallow copy of it."""
        if self._local_env is None:
            self._local_env = self.build_worker_setup_fn()()
        return dict(self._local_env)

    @classmethod
    def declared_env_keys(cls, params: Mapping[str, Any]) -> Set[str]:
        """``dataset``, ``model`` and every ``params`` key (see ``EnvironmentProvider.declared_env_keys``)."""
        return {"dataset", "model", *params}
