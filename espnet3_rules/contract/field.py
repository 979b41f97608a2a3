""":class:`Field`: the declaration of one input or output.

At ESPnet3's path (``espnet3.contract.field``).
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from typing import Any, Mapping, Optional

from espnet3_rules.contract.kinds import KINDS
from espnet3_rules.engine.contracts import ContractError, ContractTypeError


@dataclass(frozen=True)
class Field:
    """One input or output: its name, its kind, and how values of it are checked.

    Args:
        name: The key the value is passed or returned under; a Python identifier.
        kind: A name in :data:`~espnet3_rules.contract.kinds.KINDS` (``audio``,
            ``text``, ``segments``, ``number``, or a registered one).
        label: What a page calls it; defaults to the name with underscores as
            spaces, first letter capitalised.
        optional: An input the caller may leave out (or give as ``None``); the
            backend then does not receive it. Outputs are never optional.
        channels: The audio channel count required, or ``None`` to keep any.
        options: Kind-specific settings (``normalize``, ``sample_rate``,
            ``rate_policy``), checked by the kind.

    Raises:
        ValueError: An unknown kind or option, a name that is not an identifier,
            or ``channels`` below 1.
        TypeError: ``options`` is not a mapping, or ``normalize`` not names.
    """

    name: str
    kind: str
    label: str = ""
    optional: bool = False
    channels: Optional[int] = None
    options: Mapping[str, Any] = dataclass_field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ContractError(f"Field {self.name!r} has kind {self.kind!r}; known kinds are {sorted(KINDS)}")
        if not isinstance(self.options, Mapping):
            raise ContractTypeError(f"Field.options must be a mapping, not {type(self.options).__name__}")
        KINDS[self.kind].validate_options(self.options)
        if not self.name.isidentifier():
            raise ContractError(f"Field name {self.name!r} must be a Python identifier")
        if self.channels is not None and self.channels < 1:
            raise ContractError(f"Field {self.name!r}: channels must be None or >= 1")
        if not self.label:
            object.__setattr__(self, "label", self.name.replace("_", " ").capitalize())
