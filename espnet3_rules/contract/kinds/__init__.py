"""The kinds a contract field can hold, and their registry :data:`KINDS`.

At ESPnet3's path (``espnet3.contract.kinds``). ``audio``, ``text``,
``segments`` and ``number`` are built in; a new modality is a :class:`Kind`
subclass registered with :func:`register_kind`::

    from espnet3_rules.contract import Kind, register_kind

    class Messages(Kind):
        def check(self, value, field, model, *, output):
            if not isinstance(value, list):
                raise TypeError(f"{field.name} must be a list of turns")
            return value

    register_kind("messages", Messages())
"""

from __future__ import annotations

from typing import Dict

from espnet3_rules.contract.kinds.audio import Audio, AudioKind
from espnet3_rules.contract.kinds.base import Kind
from espnet3_rules.contract.kinds.number import NumberKind
from espnet3_rules.contract.kinds.segments import SegmentsKind
from espnet3_rules.contract.kinds.text import TextKind
from espnet3_rules.engine.contracts import ContractError, ContractTypeError

#: The kinds, by the name a field's ``kind`` gives.
KINDS: Dict[str, Kind] = {
    "audio": AudioKind(),
    "text": TextKind(),
    "segments": SegmentsKind(),
    "number": NumberKind(),
}


def register_kind(name: str, kind: Kind, *, replace: bool = False) -> None:
    """Register ``kind`` under ``name`` so that fields can declare it.

    Args:
        name: The name fields use (``kind: messages``).
        kind: The :class:`Kind` instance that checks and converts its values.
        replace: Allow redefining a registered name (off, so two systems cannot
            silently disagree on one).

    Returns:
        None.

    Raises:
        TypeError: ``kind`` is not a :class:`Kind` instance.
        ValueError: ``name`` is taken and ``replace`` is false.
    """
    if not isinstance(kind, Kind):
        raise ContractTypeError(f"a kind is a Kind instance, not {type(kind).__name__}")
    if name in KINDS and not replace:
        raise ContractError(f"kind {name!r} is already registered; pass replace=True to redefine it")
    KINDS[name] = kind


__all__ = ["KINDS", "Audio", "AudioKind", "Kind", "NumberKind", "SegmentsKind", "TextKind", "register_kind"]
