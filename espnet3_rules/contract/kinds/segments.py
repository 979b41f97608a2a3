"""The ``segments`` kind: a list of spans, dicts with ``text``, ``start`` and ``end`` (seconds).

At ESPnet3's path (``espnet3.contract.kinds.segments``).
"""

from __future__ import annotations

from typing import Any, List, Mapping

from espnet3_rules.contract.kinds.base import Kind, direction
from espnet3_rules.engine.contracts import ContractTypeError

_REQUIRED = frozenset({"text", "start", "end"})


class SegmentsKind(Kind):
    """``segments``: dicts with ``text``, ``start`` and ``end``; extra keys (``score``) pass; pieces append."""

    def check(self, value: Any, field: Any, model: Any, *, output: bool) -> List[Mapping[str, Any]]:
        """Return ``value`` if it is a list of mappings that each have ``text``, ``start`` and ``end``.

        Raises:
            TypeError: Anything else.
        """
        if not isinstance(value, list) or not all(isinstance(s, Mapping) and _REQUIRED <= set(s) for s in value):
            raise ContractTypeError(
                f"{field.name!r} {direction(output)} must be a list of dicts with text, start and end"
            )
        return value

    def join(self, first: List[Any], second: List[Any]) -> List[Any]:
        """One list holding both."""
        return first + second
