"""The ``text`` kind: a ``str``; pieces of a stream append.

At ESPnet3's path (``espnet3.contract.kinds.text``).
"""

from __future__ import annotations

from typing import Any

from espnet3_rules.contract.kinds.base import Kind, direction
from espnet3_rules.engine.contracts import ContractTypeError


class TextKind(Kind):
    """``text``: a ``str``, with the normalizers ``strip``, ``to_lower`` and ``to_upper``."""

    normalizers = {"strip": str.strip, "to_lower": str.lower, "to_upper": str.upper}

    def check(self, value: Any, field: Any, model: Any, *, output: bool) -> str:
        """Return ``value`` if it is a ``str``.

        Raises:
            TypeError: ``value`` is not a ``str`` (``'text' returned as int, must be str``).
        """
        if not isinstance(value, str):
            raise ContractTypeError(f"{field.name!r} {direction(output)} as {type(value).__name__}, must be str")
        return value

    def join(self, first: str, second: str) -> str:
        """The two texts appended."""
        return first + second
