"""The recipe's registry of normalizers: named value -> value transformations.

At ESPnet3's path (``espnet3.contract.normalizers``). A field lists names in its
``normalize`` option; a name is looked up first here, then among its kind's own
(``strip``, ``to_lower``, ``to_upper`` for text; ``first_channel``,
``mean_channels`` for audio), a name registered here winning.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from espnet3_rules.engine.contracts import ContractError, ContractTypeError

#: Normalizers registered by recipes (``contract.imports`` modules), by name.
NORMALIZERS: Dict[str, Callable[[Any], Any]] = {}


def register_normalizer(name: str, function: Callable[[Any], Any], *, replace: bool = False) -> None:
    """Register ``function`` under ``name`` for fields' ``normalize`` lists.

    The kind checks the normalizer's result again, so it must return a value of
    the kind it was given (a ``str`` for text, an ``Audio`` for audio).

    Args:
        name: The name a config's ``normalize`` uses.
        function: A callable from a checked value of a kind to a value of that kind.
        replace: Allow redefining a name that is already registered.

    Returns:
        None.

    Raises:
        TypeError: ``function`` is not callable.
        ValueError: ``name`` is already registered and ``replace`` is false.
    """
    if not callable(function):
        raise ContractTypeError(f"normalizer must be callable (got {type(function).__name__} for {name!r})")
    if name in NORMALIZERS and not replace:
        raise ContractError(f"normalizer {name!r} is already registered; pass replace=True to redefine it")
    NORMALIZERS[name] = function
