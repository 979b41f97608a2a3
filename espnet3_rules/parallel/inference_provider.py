"""InferenceProvider: a provider whose env is ``{"dataset", "model", **params}``.

At ESPnet3's path (``espnet3.parallel.inference_provider``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable, Dict, Mapping, Optional, Set

from espnet3_rules.parallel.env_provider import EnvironmentProvider


def inference_env_keys(cls: type, params: Mapping[str, Any]) -> Set[str]:
    """``dataset``, ``model`` and every ``params`` key: the env of both InferenceProviders
    (their ``declared_env_keys``, see ``EnvironmentProvider.declared_env_keys``)."""
    return {"dataset", "model", *params}


def build_inference_env(builders: Any, config: Any, params: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"dataset": builders.build_dataset(config), "model": builders.build_model(config), **params}``
    (``builders``: a provider, or its class where the setup function must not capture it)."""
    env = {"dataset": builders.build_dataset(config), "model": builders.build_model(config)}
    env.update(params)
    return env


class _BuiltOnFirstUse:
    """``provider._local_env``: the env, built by ``build_worker_setup_fn()()`` on first access, then kept.

    ESPnet3 builds it at the end of ``__init__``; reading it anywhere after that
    (a subclass's ``__init__``, a method) gives the same env here, but a provider
    that is only constructed (the plan step) builds nothing.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, provider: Any, owner: Optional[type] = None) -> Any:
        if provider is None:
            return self
        env = provider.build_worker_setup_fn()()
        provider.__dict__[self.name] = env  # an instance attribute: later reads bypass this descriptor
        return env


class InferenceProvider(EnvironmentProvider):
    """Provider specialised for dataset/model inference.

    Subclasses implement the static builders ``build_dataset(config)`` and
    ``build_model(config)``. ``params`` are extra env entries (device, beam size,
    ``input_key``, ...); as in ESPnet3 they are not merged into ``config`` (the
    builders see the config as given; ``espnet3_rules.systems.base.inference_provider``
    is the provider that merges them).

    The local env ``self._local_env`` is built once per provider by the same
    setup function workers use; ``build_env_local()`` returns a shallow copy of it.
    """

    _local_env = _BuiltOnFirstUse()

    def __init__(self, config: Any = None, params: Optional[Dict[str, Any]] = None):
        """Keep ``config`` and ``params`` (the env itself is built on first use)."""
        super().__init__(config if config is not None else {})
        self.params: Dict[str, Any] = params or {}

    @staticmethod
    @abstractmethod
    def build_dataset(config: Any) -> Any:
        """Build the dataset.

        Args:
            config: The provider's config.

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
            config: The provider's config.

        Returns:
            The model, the env's ``model``.
        """
        raise NotImplementedError

    def build_worker_setup_fn(self) -> Callable[[], Dict[str, Any]]:
        """Return a setup function building a fresh ``{"dataset", "model", **params}`` on each call
        (``params`` as they are now; the builders are looked up on this provider, as ESPnet3 does)."""
        config, params = self.config, dict(self.params)
        return lambda: build_inference_env(self, config, params)

    def build_env_local(self) -> Dict[str, Any]:
        """A shallow copy of ``self._local_env`` (built on the first call, then reused)."""
        return dict(self._local_env)

    @classmethod
    def config_with_params(cls, config: Any, params: Mapping[str, Any]) -> Any:
        """The config the builders of a provider of this class see: ``config`` itself (params stay out).

        Not part of ESPnet3's contract: the plan step calls ``build_dataset`` with it
        without constructing the provider.
        """
        return config

    declared_env_keys = classmethod(inference_env_keys)
