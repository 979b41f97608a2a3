"""The ``number`` kind: a real number (``int``, ``float``, a NumPy scalar), never a ``bool``.

At ESPnet3's path (``espnet3.contract.kinds.number``).
"""

from __future__ import annotations

import numbers
from typing import Any

from espnet3_rules.contract.kinds._numpy import is_numpy
from espnet3_rules.contract.kinds.base import Kind, direction
from espnet3_rules.engine.contracts import ContractTypeError


class NumberKind(Kind):
    """``number``: one real scalar (what a metric's outputs hold); pieces do not join."""

    def check(self, value: Any, field: Any, model: Any, *, output: bool) -> Any:
        """Return ``value`` if it is a ``numbers.Real`` other than ``bool`` / ``np.bool_``.

        Raises:
            TypeError: Anything else (``'WER' returned as bool, must be a real number``).
        """
        if isinstance(value, bool) or is_numpy(value, "bool_") or not isinstance(value, numbers.Real):
            raise ContractTypeError(
                f"{field.name!r} {direction(output)} as {type(value).__name__}, must be a real number"
            )
        return value
