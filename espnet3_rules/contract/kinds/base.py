"""The :class:`Kind` interface: what a field's ``kind`` means for its values.

At ESPnet3's path (``espnet3.contract.kinds.base``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, FrozenSet, List, Mapping

from espnet3_rules.contract.normalizers import NORMALIZERS
from espnet3_rules.engine.contracts import ContractError, ContractTypeError

if TYPE_CHECKING:
    from espnet3_rules.contract.field import Field


def direction(output: bool) -> str:
    """``returned`` for a hook's result, ``given`` for a caller's input (the word errors use)."""
    return "returned" if output else "given"


def normalizer_names(options: Mapping[str, Any]) -> List[str]:
    """The ``normalize`` option as a list of names (one name may be given bare)."""
    names = options.get("normalize", ()) or ()
    return [names] if isinstance(names, str) else names


class Kind(ABC):
    """How values of one kind are checked, converted, normalized and joined.

    Subclass it and pass an instance to
    :func:`~espnet3_rules.contract.kinds.register_kind` for a new modality.
    A subclass implements :meth:`check`; it may add options (extend
    ``option_names`` and :meth:`validate_options`), its own ``normalizers``,
    :meth:`check_configured` for option-dependent rules, and :meth:`join`.
    """

    #: The options a field of this kind may carry.
    option_names: ClassVar[FrozenSet[str]] = frozenset({"normalize"})
    #: This kind's own normalizers, by name (a registered one of the same name wins).
    normalizers: ClassVar[Dict[str, Callable[[Any], Any]]] = {}

    def validate_options(self, options: Mapping[str, Any]) -> None:
        """Check a field's options: known names, and ``normalize`` naming known normalizers.

        Args:
            options: The field's kind-specific options.

        Returns:
            None.

        Raises:
            ValueError: An unknown option or normalizer name.
            TypeError: ``normalize`` is not a name or a list of names.
        """
        unknown = set(options) - self.option_names
        if unknown:
            raise ContractError(f"Unknown {type(self).__name__} option(s): {sorted(unknown)}")
        names = normalizer_names(options)
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            raise ContractTypeError(f"normalize must contain normalizer names, not {names!r}")
        unknown = set(names) - set(self.normalizers) - set(NORMALIZERS)
        if unknown:
            raise ContractError(f"Unknown inference normalizer(s): {sorted(unknown)}")

    def check_configured(self, value: Any, field: "Field", model: Any, options: Mapping[str, Any], *,
                         output: bool) -> Any:
        """:meth:`check` with the field's options at hand; override for option-dependent rules.

        Args:
            value: What the caller gave, or what the hook returned.
            field: The declaration the value is for.
            model: The backend, for what it knows (its ``sample_rate``).
            options: The field's kind-specific options.
            output: Whether ``value`` is a hook's result.

        Returns:
            ``value`` in the form this kind holds it.
        """
        return self.check(value, field, model, output=output)

    def apply(self, value: Any, field: "Field", model: Any, options: Mapping[str, Any], *, output: bool) -> Any:
        """Check ``value``, run the field's normalizers in order, and check the result again.

        The field's ``channels`` is enforced only on the final value, since a
        normalizer may change the channel count.

        Args:
            value: What the caller gave, or what the hook returned.
            field: The declaration the value is for.
            model: The backend, for what it knows (its ``sample_rate``).
            options: The field's kind-specific options, ``normalize`` among them.
            output: Whether ``value`` is a hook's result.

        Returns:
            The checked, normalized value.
        """
        names = normalizer_names(options)
        if not names:
            return self.check_configured(value, field, model, options, output=output)
        loose = dataclasses.replace(field, channels=None)
        result = self.check_configured(value, loose, model, options, output=output)
        available = {**self.normalizers, **NORMALIZERS}
        for name in names:
            result = available[name](result)
        return self.check_configured(result, field, model, options, output=output)

    def to_model_input(self, value: Any, field: "Field") -> Any:
        """What the backend receives for a checked input value (the value itself unless overridden)."""
        return value

    def to_demo_output(self, value: Any) -> Any:
        """What a demo component shows for a checked output (the value itself unless overridden)."""
        return value

    @abstractmethod
    def check(self, value: Any, field: "Field", model: Any, *, output: bool) -> Any:
        """Return ``value`` in the form this kind holds it, or raise ``TypeError``.

        Args:
            value: What the caller gave, or what the hook returned.
            field: The declaration (its name for the error, per-field details).
            model: The backend, for what it knows (its ``sample_rate``).
            output: Whether ``value`` is a hook's result rather than an input.

        Returns:
            The value as this kind holds it.
        """

    def join(self, first: Any, second: Any) -> Any:
        """Join two consecutive pieces of one streamed field; kinds that stream override it.

        Raises:
            NotImplementedError: This kind does not say how pieces join.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not say how two pieces join; override join() to stream this kind"
        )

    def is_batch(self, value: Any, field: "Field", model: Any) -> bool:
        """Whether ``value`` is a list with one entry per sample: a list that :meth:`check` refuses."""
        return isinstance(value, list) and not self._checks(value, field, model)

    def accepts(self, value: Any, field: "Field") -> bool:
        """Whether :meth:`check` accepts ``value`` with no model (a ``TypeError`` means no)."""
        return self._checks(value, field, None)

    def _checks(self, value: Any, field: "Field", model: Any) -> bool:
        try:
            self.check(value, field, model, output=False)
        except TypeError:
            return False
        return True
