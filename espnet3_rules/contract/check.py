""":func:`check_declaration`: the rules for a class's ``inputs`` / ``outputs`` fields.

At ESPnet3's path (``espnet3.contract.check``).
"""

from __future__ import annotations

from typing import Any

from espnet3_rules.contract.field import Field
from espnet3_rules.engine.contracts import ContractTypeError


def _check_fields(owner: str, attr: str, fields: Any) -> None:
    """A nonempty tuple of :class:`Field` with distinct names."""
    if not isinstance(fields, tuple) or not all(isinstance(f, Field) for f in fields):
        raise ContractTypeError(f"{owner}.{attr} must be a tuple of Field")
    if not fields:
        raise ContractTypeError(f"{owner}.{attr} must name at least one field")
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ContractTypeError(f"{owner}.{attr} repeats a name: {names}")


def check_declaration(obj: Any, inputs_attr: str = "inputs", outputs_attr: str = "outputs") -> None:
    """Check that ``obj`` declares its fields correctly.

    The rules: each of the two attributes is a nonempty tuple of :class:`Field`
    with distinct names; required inputs come before optional ones (so a call by
    position means one thing); no output is optional.

    Args:
        obj: A class, or an instance whose own attributes declare the fields.
        inputs_attr: The name of the inputs attribute.
        outputs_attr: The name of the outputs attribute.

    Returns:
        None.

    Raises:
        TypeError: Naming the class and the rule broken.
    """
    owner = (obj if isinstance(obj, type) else type(obj)).__qualname__
    for attr in (inputs_attr, outputs_attr):
        _check_fields(owner, attr, getattr(obj, attr, None))
    flags = [f.optional for f in getattr(obj, inputs_attr)]
    if flags != sorted(flags):
        raise ContractTypeError(
            f"{owner}.{inputs_attr} must list required fields before optional ones, "
            "so a call by position means one thing"
        )
    if any(f.optional for f in getattr(obj, outputs_attr)):
        raise ContractTypeError(f"{owner}: {outputs_attr} cannot be optional")
