"""At ESPnet3's path ``espnet3.systems.base.inference_provider``: the provider ESPnet3's systems build.

Not the class of :mod:`espnet3_rules.parallel.inference_provider` (as in ESPnet3, the
two differ): this one merges ``params`` into its config, has concrete builders
(``config.dataset`` / ``config.model`` through Hydra's ``instantiate``) and builds
a fresh env on every ``build_env_local()`` call. Hydra and torch are imported only
when something is built.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional

from espnet3_rules.engine.contracts import (
    ContractAttributeError,
    ContractError,
    ContractKeyError,
    ContractRuntimeError,
)
from espnet3_rules.parallel.env_provider import EnvironmentProvider
from espnet3_rules.parallel.inference_provider import build_inference_env, inference_env_keys

#: Held while a model is built: a ``recipe_dir`` build changes the process's working directory.
_MODEL_BUILD_LOCK = threading.RLock()


def _as_config(config: Any) -> Any:
    """``config`` as an OmegaConf ``DictConfig`` (a plain mapping, or ``None`` for an empty one)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return config
    if config is None:
        config = {}
    return OmegaConf.create(dict(config) if isinstance(config, Mapping) else config)


def _required(config: Any, key: str, hook: str) -> Any:
    """``config[key]``; a missing key as the ``AttributeError`` ESPnet3's attribute access gives."""
    if key not in config:
        raise ContractAttributeError(f"InferenceProvider.{hook}(config): config has no {key!r} (it has {sorted(config)})")
    return config[key]


@contextmanager
def _inside(directory: str) -> Iterator[None]:
    """Work in ``directory`` without making it importable: relative ``sys.path`` entries
    (``""``, ``"."``) are taken out meanwhile, so its files cannot shadow installed modules."""
    cwd, saved_path = os.getcwd(), list(sys.path)
    sys.path[:] = [entry for entry in sys.path if os.path.isabs(entry)]
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path[:] = saved_path


def _bind_file_paths(obj: Any, seen: Optional[set] = None) -> None:
    """Make the relative string attributes of ``obj`` (and of the objects it holds) that name
    existing files absolute, while the working directory is still the recipe directory:
    a component that opens such a file later (a tokenizer) then still finds it."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        attributes = getattr(obj, "__dict__", None) or {}
        children = []
        for name, value in list(attributes.items()):
            if isinstance(value, str) and not os.path.isabs(value) and os.path.isfile(value):
                try:
                    setattr(obj, name, os.path.abspath(value))
                except (AttributeError, TypeError):
                    pass
            else:
                children.append(value)
    for child in children:
        _bind_file_paths(child, seen)


class InferenceProvider(EnvironmentProvider):
    """Builds ``{"dataset", "model", **params}`` from a Hydra-style inference config.

    Args:
        inference_config: The config; ``dataset`` (a DataOrganizer config), ``test_set``
            (the name of its test set) and ``model`` are what the default builders read.
            ``None`` is an empty config.
        params: Extra env entries (device, beam size, ``input_key``, ...); also merged
            into ``inference_config`` in place (``inference_config.update(params)``), so
            the builders see them.

    A subclass overrides ``build_dataset`` and/or ``build_model`` (static methods);
    the setup function workers run does not capture the provider.
    """

    def __init__(self, inference_config: Any = None, params: Optional[Dict[str, Any]] = None):
        """Keep the config and ``params``; merge ``params`` into the config."""
        super().__init__(inference_config if inference_config is not None else {})
        self.params: Dict[str, Any] = params or {}
        self.config = type(self).config_with_params(self.config, self.params)

    @classmethod
    def config_with_params(cls, config: Any, params: Mapping[str, Any]) -> Any:
        """``config`` with ``params`` merged in (``config.update(params)``, in place).

        Not part of ESPnet3's contract: the plan step calls ``build_dataset`` with it
        without constructing the provider.
        """
        config.update(params)
        return config

    def build_env_local(self) -> Dict[str, Any]:
        """Build a fresh env (dataset and model) on every call, with the current ``params``."""
        return build_inference_env(self, self.config, self.params)

    def build_worker_setup_fn(self) -> Callable[[], Dict[str, Any]]:
        """Return a setup function building a fresh env per call from the class's builders
        and a snapshot of the config and ``params`` (it does not capture the provider)."""
        cls, config, params = type(self), self.config, dict(self.params)
        return lambda: build_inference_env(cls, config, params)

    @staticmethod
    def build_dataset(config: Any) -> Any:
        """The test set ``config.test_set`` of the organizer ``instantiate(config.dataset)``.

        Args:
            config: A mapping with ``dataset`` (a Hydra config of a DataOrganizer-like
                object whose ``test`` maps names to datasets) and ``test_set``.

        Returns:
            ``organizer.test[config.test_set]``.
        """
        from hydra.utils import instantiate

        config = _as_config(config)
        dataset_config = _required(config, "dataset", "build_dataset")
        name = _required(config, "test_set", "build_dataset")
        test_sets = instantiate(dataset_config).test
        try:
            return test_sets[name]
        except KeyError:
            known = sorted(map(str, test_sets)) if isinstance(test_sets, Mapping) else "?"
            raise ContractKeyError(f"test_set {name!r} is not a test set of config.dataset (it has {known})") from None

    @staticmethod
    def build_model(config: Any) -> Any:
        """``instantiate(config.model, device=...)`` on this process's device (see ``_resolve_device``).

        Args:
            config: A mapping with ``model`` (a Hydra config). With ``recipe_dir``,
                the model is built inside that directory (without making it
                importable), so relative paths in ``model`` resolve against it.

        Returns:
            The model.
        """
        from hydra.utils import instantiate

        config = _as_config(config)
        model_config = _required(config, "model", "build_model")
        device = InferenceProvider._resolve_device(config)
        recipe_dir = config.get("recipe_dir")
        with _MODEL_BUILD_LOCK:  # also while another thread's build has changed directory
            if not recipe_dir:
                return instantiate(model_config, device=device)
            with _inside(str(recipe_dir)):
                model = instantiate(model_config, device=device)
                _bind_file_paths(model)
                return model

    @staticmethod
    def _resolve_device(config: Any) -> str:
        """The device this process builds the model on.

        In order: an explicit ``config.device``; ``"cpu"`` without CUDA (or without
        torch); ``cuda:<i>`` for the logical index ``config.device_index``, else
        ``config.local_rank``, else ``$LOCAL_RANK``; else ``cuda:0``, the first GPU
        this process sees (a shard sees only its own through ``CUDA_VISIBLE_DEVICES``).
        """
        config = _as_config(config)
        explicit = config.get("device")
        if explicit not in (None, ""):
            return str(explicit)
        try:
            import torch
        except ImportError:
            return "cpu"
        if not torch.cuda.is_available():
            return "cpu"
        sources = [(key, config.get(key)) for key in ("device_index", "local_rank")]
        sources.append(("$LOCAL_RANK", os.environ.get("LOCAL_RANK")))
        key, raw = next(((k, v) for k, v in sources if v not in (None, "")), (None, None))
        if key is None:
            return "cuda:0"
        try:
            index = int(raw)
        except (TypeError, ValueError):
            raise ContractError(f"{key} {raw!r} is not a CUDA device index") from None
        visible = torch.cuda.device_count()
        if not 0 <= index < visible:
            raise ContractRuntimeError(
                f"Invalid CUDA device index {index} for the current process ({key}); visible GPU count is {visible}."
            )
        return f"cuda:{index}"

    declared_env_keys = classmethod(inference_env_keys)
