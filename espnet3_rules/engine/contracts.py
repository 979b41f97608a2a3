"""Contract checks that ESPnet3 only hits late on a worker, run here at plan time.

Every check raises :class:`ContractError` with a one-line message naming the class,
hook or key at fault.
"""

from __future__ import annotations

import importlib
import inspect
from functools import lru_cache
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple


class ContractError(ValueError):
    """A provider/runner/config breaks the ESPnet3 contract (one line, naming the class, hook or key)."""


class ContractRuntimeError(ContractError, RuntimeError):
    """A :class:`ContractError` where ESPnet3 raises ``RuntimeError`` (so ``except RuntimeError`` still catches it)."""


class ContractKeyError(ContractError, KeyError):
    """A :class:`ContractError` where ESPnet3 raises ``KeyError``; its text is the message, unquoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ContractTypeError(ContractError, TypeError):
    """A :class:`ContractError` where ESPnet3 raises ``TypeError``."""


class ContractAttributeError(ContractError, AttributeError):
    """A :class:`ContractError` where ESPnet3 raises ``AttributeError`` (e.g. a config key it reads is missing)."""


class ContractFileNotFoundError(ContractError, FileNotFoundError):
    """A :class:`ContractError` where ESPnet3 raises ``FileNotFoundError`` (a shard not complete at merge)."""


class ContractAssertionError(ContractError, AssertionError):
    """A :class:`ContractError` where ESPnet3 asserts (``infer``'s test-set checks, SCP inputs out of step, a missing input file)."""


def import_object(path: str, what: str = "object") -> Any:
    """Import ``package.module.Name`` (nested attributes allowed), with a clear error."""
    if not isinstance(path, str) or "." not in path:
        raise ContractError(f"{what} {path!r} is not an import path like 'package.module.Name'")
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue  # this prefix (or a package of it) is not a module; try a shorter one
            raise ContractError(f"{what} {path!r}: importing {module_name!r} failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - user module raised while importing
            raise ContractError(
                f"{what} {path!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ContractError(
                f"{what} {path!r}: module {module_name!r} has no attribute {'.'.join(parts[split:])!r}"
            ) from None
        return obj
    raise ContractError(f"{what} {path!r}: no module {parts[0]!r} can be imported")


def class_path(cls: type) -> str:
    """Import path of a class (``module.QualName``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def check_runner_class(runner_cls: type) -> None:
    """Check that ``forward`` is a concrete ``@staticmethod`` or ``@classmethod`` of ``runner_cls``."""
    forward = inspect.getattr_static(runner_cls, "forward", None)
    name = runner_cls.__name__
    if forward is None:
        raise ContractError(f"{name} has no forward(); define @staticmethod forward(idx, dataset, model, **env)")
    if not isinstance(forward, (staticmethod, classmethod)):
        # ESPnet3 calls cls.forward(item, **env): an instance method fails there with a TypeError
        raise ContractTypeError(
            f"{name}.forward must be a @staticmethod or @classmethod (it is a {type(forward).__name__}); "
            "shards call it without an instance, so it must not take or capture self"
        )
    if getattr(forward.__func__, "__isabstractmethod__", False):
        raise ContractTypeError(f"{name}.forward is abstract; implement it in a subclass")


def check_setup_fn(provider: Any, setup_fn: Any) -> Callable[[], Dict[str, Any]]:
    """Check that ``build_worker_setup_fn()`` returned a zero-argument function."""
    name = type(provider).__name__
    if isinstance(setup_fn, Mapping):
        raise ContractError(
            f"{name}.build_worker_setup_fn() returned a {type(setup_fn).__name__} (the env itself); "
            "it must return a zero-argument setup function: def setup(): return {...}; return setup"
        )
    if not callable(setup_fn):
        raise ContractError(
            f"{name}.build_worker_setup_fn() returned {type(setup_fn).__name__}, not a zero-argument function"
        )
    required = [
        p.name
        for p in inspect.signature(setup_fn).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if required:
        raise ContractError(
            f"{name}.build_worker_setup_fn() returned a function that needs arguments {required}; "
            "the setup function must take none"
        )
    return setup_fn


def check_env(provider: Any, env: Any) -> Dict[str, Any]:
    """Check that a built env is a dict with string keys."""
    if not isinstance(env, Mapping):
        raise ContractError(
            f"{type(provider).__name__} built a {type(env).__name__} env; the env must be a dict of name -> object"
        )
    bad = [k for k in env if not isinstance(k, str)]
    if bad:
        raise ContractError(f"{type(provider).__name__} env has non-string keys {bad!r}")
    return dict(env)


def env_dataset(provider: Any, env: Any) -> Any:
    """``env["dataset"]``; without one, an error naming the keys the env has (ESPnet3's mismatched names)."""
    env = check_env(provider, env)
    if "dataset" not in env:
        raise ContractError(
            f"{type(provider).__name__}'s env has no 'dataset' (it has {sorted(env)}); "
            "name the dataset 'dataset' or set items: N in the config"
        )
    return env["dataset"]


@lru_cache(maxsize=None)
def _signature_info(fn: Callable) -> Tuple[Tuple[str, ...], Tuple[str, ...], bool]:
    """(names it accepts by keyword, names it requires, takes **kwargs) after its leading positionals."""
    params = list(inspect.signature(fn).parameters.values())
    accepted, required, var_kw = [], [], False
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            accepted.append(p.name)
            if p.default is p.empty:
                required.append(p.name)
    return tuple(accepted), tuple(required), var_kw


def env_kwargs(fn: Callable, env: Mapping[str, Any], n_positional: int = 0) -> Dict[str, Any]:
    """The part of ``env`` that ``fn`` accepts by name (all of it if ``fn`` takes ``**env``).

    ``n_positional`` leading parameters are filled positionally by the caller
    (``idx`` for ``forward``; ``writers, result, state`` for ``write_record``).
    """
    accepted, _, var_kw = _signature_info(fn)
    if var_kw:
        return dict(env)
    names = set(accepted[n_positional:])
    return {k: v for k, v in env.items() if k in names}


def missing_env_names(fn: Callable, env_keys: Iterable[str], n_positional: int = 1) -> Tuple[str, ...]:
    """Parameters of ``fn`` (past its positionals) with no default that no env key provides."""
    accepted, required, _ = _signature_info(fn)
    positional = set(accepted[:n_positional])
    keys = set(env_keys)
    return tuple(name for name in required if name not in positional and name not in keys)


def check_forward_env(runner_cls: type, env_keys: Iterable[str], provider_name: Optional[str] = None) -> None:
    """Check that every required ``forward`` parameter is an env key (name-based injection)."""
    keys = sorted(set(env_keys))
    missing = missing_env_names(runner_cls.forward, keys)
    if missing:
        source = f"{provider_name}'s env" if provider_name else "the env"
        raise ContractTypeError(
            f"{runner_cls.__name__}.forward needs {', '.join(map(repr, missing))} but {source} provides "
            f"{keys}; rename the env keys or the forward parameters, or read them from **env"
        )
