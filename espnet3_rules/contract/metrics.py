"""A metric's declared ``inputs``/``outputs`` and the checks against them (ESPnet3's ``espnet3.contract.metrics``).

Declaration errors are ``TypeError`` (a class is written wrong); what a metric is
given or returns breaks its declaration with :class:`MetricContractError`
(a ``ValueError``), each one line naming the metric class.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from espnet3_rules.contract.check import check_declaration
from espnet3_rules.contract.field import Field
from espnet3_rules.contract.kinds import KINDS
from espnet3_rules.engine.contracts import ContractError, ContractTypeError

#: An input source that names a column of the test set (``ref: dataset:text``), not an SCP stem.
DATASET_PREFIX = "dataset:"


class MetricContractError(ContractError):
    """What a metric is bound to, given or returns does not match its declaration (a ``ValueError``)."""


def _owner(obj: Any) -> str:
    return (obj if isinstance(obj, type) else type(obj)).__qualname__


def require_metric_declaration(obj: Any) -> None:
    """Raise ``TypeError``: ``obj`` (a class or instance) declares neither ``inputs`` nor ``outputs``."""
    raise ContractTypeError(
        f"{_owner(obj)} does not declare inputs/outputs; declare `inputs`/`outputs` as tuples of Field "
        "(class attributes, or set on `self` before calling super().__init__())"
    )


def check_metric_declaration(obj: Any) -> None:
    """Raise ``TypeError`` unless every declared output has kind ``number`` (the metric-only rule)."""
    for field in obj.outputs:
        if field.kind != "number":
            raise ContractTypeError(
                f"{_owner(obj)}.outputs field {field.name!r} must have kind 'number', not {field.kind!r}"
            )


def check_metric_contract(metric: Any) -> None:
    """Raise ``TypeError`` unless ``metric`` declares a valid contract (``measure`` checks every metric again,
    since a subclass ``__init__`` may skip ``super().__init__()``)."""
    if not (hasattr(metric, "inputs") or hasattr(metric, "outputs")):
        require_metric_declaration(metric)
    check_declaration(metric)
    check_metric_declaration(metric)


def check_metric_inputs(metric: Any, inputs: Any) -> Optional[Dict[str, str]]:
    """Check a metrics config's ``inputs`` binding against the metric's declared inputs.

    Args:
        metric: A metric instance.
        inputs: ``declared name -> source`` (an SCP stem the inference wrote, or
            ``dataset:<column>``), or a list of names that are their own sources.

    Returns:
        The binding as a dict, or ``None`` when the metric declares no inputs.

    Raises:
        MetricContractError: No binding, a required name unbound, an undeclared name
            bound, or a source that is not a non-empty string.
    """
    fields = getattr(metric, "inputs", ())
    if not fields:
        return None
    name = type(metric).__name__
    if inputs is None:
        raise MetricContractError(f"{name} declares inputs; bind them in the metrics config (inputs: {{name: source}})")
    bindings = dict(inputs) if isinstance(inputs, Mapping) else {str(key): key for key in inputs}
    declared = {field.name for field in fields}
    missing = {field.name for field in fields if not field.optional} - set(bindings)
    unknown = set(bindings) - declared
    if missing or unknown:
        raise MetricContractError(f"{name} inputs: missing {sorted(missing)}, unknown {sorted(unknown)}")
    for key, source in bindings.items():
        if not isinstance(source, str) or source in ("", DATASET_PREFIX):
            raise MetricContractError(
                f"{name} input {key!r} needs an SCP stem or dataset column (e.g. hyp or dataset:text), got {source!r}"
            )
    return bindings


def check_metric_output(metric: Any, result: Mapping[str, Any]) -> None:
    """Raise :class:`MetricContractError` unless ``result`` holds every declared output as a number."""
    outputs = getattr(metric, "outputs", None)
    if not outputs:
        return
    name = type(metric).__name__
    declared = [field.name for field in outputs]
    missing = [key for key in declared if key not in result]
    if missing:
        raise MetricContractError(
            f"{name} declares outputs {declared} but returned {sorted(result)}; missing {missing}"
        )
    for field in outputs:
        try:
            KINDS[field.kind].check(result[field.name], field, model=None, output=True)
        except TypeError as exc:
            raise MetricContractError(f"{name}.outputs field {field.name!r} must be {field.kind}: {exc}") from None


def check_metric_batch(metric: Any, values: Mapping[str, Any]) -> None:
    """Raise :class:`MetricContractError` unless ``values`` is one batch for ``metric.update``.

    A batch maps declared input names to lists (or tuples) of one element per
    utterance: no undeclared name, every required one present (an optional one
    may be absent or ``None``), equal lengths, every element of its field's kind.
    """
    name = type(metric).__name__
    fields = {field.name: field for field in getattr(metric, "inputs", ())}
    declared = ", ".join(fields)
    for key in values:
        if key not in fields:
            raise MetricContractError(f"{name} got input {key!r}; declared inputs: {declared}")
    given = {}
    for key, field in fields.items():
        value = values.get(key)
        if value is None:
            if not field.optional:
                raise MetricContractError(f"{name} input {key!r} is missing; declared inputs: {declared}")
        elif not isinstance(value, (list, tuple)):
            raise MetricContractError(f"{name} input {key!r} must be a list or tuple, not {type(value).__name__}")
        else:
            given[key] = value
    lengths = {key: len(value) for key, value in given.items()}
    if len(set(lengths.values())) > 1:
        first, *_ = lengths
        other = next(key for key in lengths if lengths[key] != lengths[first])
        raise MetricContractError(f"{name} input {other!r} has {lengths[other]} items, {first!r} has {lengths[first]}")
    for key, value in given.items():
        field = fields[key]
        for position, element in enumerate(value):
            if not KINDS[field.kind].accepts(element, field):
                raise MetricContractError(
                    f"{name} input {key!r}[{position}] is {type(element).__name__}, must be {field.kind}"
                )


__all__ = [
    "DATASET_PREFIX",
    "Field",
    "MetricContractError",
    "check_metric_batch",
    "check_metric_declaration",
    "check_metric_inputs",
    "check_metric_output",
    "require_metric_declaration",
]
