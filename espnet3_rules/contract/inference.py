"""The inference config's ``contract:`` section: declared inputs and outputs, checked per sample.

At ESPnet3's path (``espnet3.contract.inference``). A contract reads::

    contract:
      imports: [src.contracts]            # modules that register normalizers / kinds
      inputs:
        speech: {kind: audio, sample_rate: 16000, channels: 1}
        prompt: {kind: text, optional: true}
      outputs:
        text: {kind: text, normalize: [strip, to_lower]}

Each entry's ``kind``, ``label``, ``optional`` and ``channels`` declare the
:class:`~espnet3_rules.contract.Field`; every other key is a kind option.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from omegaconf import OmegaConf

from espnet3_rules.contract.field import Field
from espnet3_rules.contract.kinds import KINDS
from espnet3_rules.engine.contracts import ContractError, ContractKeyError, ContractTypeError

_SECTIONS = frozenset({"imports", "inputs", "outputs"})
#: The entry keys that are Field parameters; every other key is a kind option.
_FIELD_KEYS = frozenset(f.name for f in dataclasses.fields(Field)) - {"name", "options"}


@dataclass(frozen=True)
class InferenceContract:
    """The declared inputs and outputs of an inference backend.

    Args:
        inputs: The input fields (dataset columns the backend receives).
        outputs: The output fields (names the backend returns).
        imports: The modules loaded for it (they registered normalizers or kinds).
    """

    inputs: Tuple[Field, ...]
    outputs: Tuple[Field, ...]
    imports: Tuple[str, ...] = ()

    def prepare_input(self, sample: Mapping[str, Any], model: Any) -> Dict[str, Any]:
        """Check and normalize the declared inputs of one dataset item.

        An optional input that is absent or ``None`` is left out; keys that are
        not declared pass through unchanged.

        Args:
            sample: One dataset item.
            model: The backend, for what it knows (its ``sample_rate``).

        Returns:
            A copy of ``sample`` with the declared inputs as the backend receives them.

        Raises:
            TypeError: ``sample`` is not a mapping (or a value is not of its kind).
            KeyError: A required input is missing.
        """
        if not isinstance(sample, Mapping):
            raise ContractTypeError(f"inference input must be a mapping, not {type(sample).__name__}")
        prepared = dict(sample)
        for spec in self.inputs:
            present = spec.name in sample
            value = sample[spec.name] if present else None
            if not present or (spec.optional and value is None):
                if not spec.optional:
                    raise ContractKeyError(
                        f"Required inference input {spec.name!r} is missing (the item has {sorted(map(str, sample))})"
                    )
                prepared.pop(spec.name, None)
                continue
            kind = KINDS[spec.kind]
            prepared[spec.name] = kind.to_model_input(kind.apply(value, spec, model, spec.options, output=False), spec)
        return prepared

    def validate_input_keys(self, input_key: Union[str, Sequence[str], None]) -> None:
        """Check that ``input_key`` names exactly the declared inputs (optional ones too).

        Args:
            input_key: The config's ``input_key``: one name or a list.

        Returns:
            None.

        Raises:
            ValueError: ``input_key`` is missing, repeats a name, or differs from ``contract.inputs``.
        """
        if input_key is None:
            raise ContractError("inference input_key is required by the contract")
        keys = [input_key] if isinstance(input_key, str) else list(input_key)
        declared = [spec.name for spec in self.inputs]
        if len(keys) != len(set(keys)) or set(keys) != set(declared):
            raise ContractError(
                f"inference input_key must match contract.inputs; input_key={keys}, contract.inputs={declared}"
            )

    def prepare_output(self, result: Any, model: Any, *, idx: Any, idx_key: str,
                       sample: Mapping[str, Any]) -> Dict[str, Any]:
        """Check the backend's named outputs for one sample and attach its identifier.

        Args:
            result: What the backend returned for the sample: output name -> value.
            model: The backend, for what it knows (its ``sample_rate``).
            idx: The sample's dataset index.
            idx_key: The key the identifier goes under (``utt_id``); it is taken from
                ``result``, else from ``sample``, else ``str(idx)``.
            sample: The original dataset item.

        Returns:
            The checked outputs (in declaration order) plus ``idx_key``.

        Raises:
            TypeError: ``result`` is not a mapping (or a value is not of its kind).
            ValueError: ``idx_key`` is a declared output, or ``result`` has an undeclared key.
            KeyError: A declared output is missing.
        """
        if not isinstance(result, Mapping):
            raise ContractTypeError(
                f"A backend with an inference contract must return a mapping, not {type(result).__name__}"
            )
        declared = {spec.name for spec in self.outputs}
        if idx_key in declared:
            raise ContractError(f"{idx_key!r} is reserved for the sample identifier; rename that output")
        extra = set(result) - declared - {idx_key}
        if extra:
            raise ContractError(
                f"Undeclared inference output(s): {sorted(extra)} (contract.outputs: {sorted(declared)})"
            )
        prepared = {}
        for spec in self.outputs:
            if spec.name not in result:
                raise ContractKeyError(f"Required inference output {spec.name!r} is missing (sample {idx!r})")
            prepared[spec.name] = KINDS[spec.kind].apply(result[spec.name], spec, model, spec.options, output=True)
        prepared[idx_key] = result.get(idx_key, sample.get(idx_key, str(idx)))
        return prepared


def _fields(raw: Any, section: str) -> Tuple[Field, ...]:
    """The fields of ``contract.inputs`` or ``contract.outputs``."""
    if not isinstance(raw, Mapping) or not raw:
        raise ContractError(f"inference contract.{section} must be a nonempty mapping")
    fields = []
    for name, entry in raw.items():
        if not isinstance(entry, Mapping):
            raise ContractTypeError(f"contract.{section}.{name} must be a mapping, not {type(entry).__name__}")
        declared = {"kind": None, **{k: v for k, v in entry.items() if k in _FIELD_KEYS}}
        options = {k: v for k, v in entry.items() if k not in _FIELD_KEYS}
        fields.append(Field(str(name), **declared, options=options))
    if section == "outputs" and any(spec.optional for spec in fields):
        raise ContractError("inference contract outputs cannot be optional")
    return tuple(fields)


def _imports(raw: Any) -> Tuple[str, ...]:
    """``contract.imports`` as a tuple of module names."""
    raw = raw or ()
    if isinstance(raw, str):
        raise ContractTypeError("contract.imports must be a list of module names, not one string")
    try:
        modules = tuple(raw)
    except TypeError:
        raise ContractTypeError(f"contract.imports must be a list of module names, not {type(raw).__name__}") from None
    if not all(isinstance(module, str) and module for module in modules):
        raise ContractTypeError(f"contract.imports must contain module names, not {list(modules)!r}")
    return modules


def load_inference_contract(config: Optional[Mapping[str, Any]], *,
                            allow_imports: bool = True) -> Optional[InferenceContract]:
    """Build the contract of an inference config's ``contract:`` section.

    The ``imports`` modules are imported first, so that the normalizers and
    kinds they register can be named by the fields.

    Args:
        config: The section: a mapping or ``DictConfig`` with ``inputs``,
            ``outputs`` and optional ``imports``; ``None`` for no contract.
        allow_imports: Whether ``imports`` may be loaded (``False`` for an untrusted bundle).

    Returns:
        The contract, or ``None`` when ``config`` is ``None``.

    Raises:
        TypeError: ``config`` or ``imports`` has the wrong type.
        ValueError: An unknown section, kind or option; or ``imports`` while
            ``allow_imports`` is false.
        ModuleNotFoundError: An ``imports`` module cannot be found.
    """
    if config is None:
        return None
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping):
        raise ContractTypeError(f"inference contract must be a mapping, not {type(config).__name__}")
    unknown = set(config) - _SECTIONS
    if unknown:
        raise ContractError(f"Unknown inference contract option(s): {sorted(unknown)}; allowed: {sorted(_SECTIONS)}")
    imports = _imports(config.get("imports"))
    if imports and not allow_imports:
        raise ContractError(f"contract.imports requires trust_user_code=True (imports: {list(imports)})")
    for module in imports:
        import_module(module)
    return InferenceContract(
        inputs=_fields(config.get("inputs"), "inputs"),
        outputs=_fields(config.get("outputs"), "outputs"),
        imports=imports,
    )


def resolve_inference_contract(contract: Union[InferenceContract, Mapping[str, Any], None],
                               root: Optional[Union[str, os.PathLike]] = None) -> Optional[InferenceContract]:
    """The contract a runner was handed: built from its mapping form, or as given.

    Args:
        contract: An :class:`InferenceContract`, its config mapping, or ``None``.
        root: A directory put first on ``sys.path`` before a mapping is loaded,
            so that its ``imports`` resolve (the recipe directory).

    Returns:
        The contract, or ``None`` when ``contract`` is ``None``.

    Raises:
        TypeError: ``contract`` is none of those.
    """
    if contract is None:
        return None
    if isinstance(contract, Mapping):
        if root and os.fspath(root) not in sys.path:
            sys.path.insert(0, os.fspath(root))
        contract = load_inference_contract(contract)
    if not isinstance(contract, InferenceContract):
        raise ContractTypeError(f"inference_contract must be an InferenceContract, not {type(contract).__name__}")
    return contract


def _indices(idx: Any) -> List[Any]:
    """A runner's ``idx`` (one index, or a list / tuple for a batch) as a list."""
    return list(idx) if isinstance(idx, (list, tuple)) else [idx]


def prepare_inference_inputs(dataset: Any, idx: Any, contract: InferenceContract,
                             model: Any) -> Tuple[Dict[Any, Dict[str, Any]], Dict[Any, Any]]:
    """Read and prepare the dataset items of one runner call.

    Args:
        dataset: The indexable dataset.
        idx: One index or a list of indices.
        contract: The inference contract.
        model: The backend, for what it knows (its ``sample_rate``).

    Returns:
        ``(prepared, original)``: two dicts keyed by dataset index, the prepared
        items (:meth:`InferenceContract.prepare_input`) and the items as read.
    """
    original = {index: dataset[index] for index in _indices(idx)}
    prepared = {index: contract.prepare_input(sample, model) for index, sample in original.items()}
    return prepared, original


def _per_sample(result: Any, idx: Any, count: int) -> Any:
    """A batch's dict of equal-length lists (one entry per sample) as a list of dicts; else ``result``."""
    if isinstance(idx, (list, tuple)) and isinstance(result, Mapping) and all(
        isinstance(values, (list, tuple)) and len(values) == count for values in result.values()
    ):
        return [{key: values[i] for key, values in result.items()} for i in range(count)]
    return result


def validate_inference_outputs(result: Any, idx: Any, contract: InferenceContract, model: Any,
                               original: Mapping[Any, Any], idx_key: str) -> Any:
    """Check what the backend returned for one runner call, one mapping per sample.

    For a batch the backend may return a list of mappings, or one mapping of
    lists (each as long as the batch), which is split per sample.

    Args:
        result: What the backend returned for ``idx``.
        idx: One index or a list of indices.
        contract: The inference contract.
        model: The backend, for what it knows (its ``sample_rate``).
        original: The items as read, keyed by index (from :func:`prepare_inference_inputs`).
        idx_key: The key the sample identifier goes under.

    Returns:
        One checked output mapping, or a list of them when ``idx`` is a list / tuple.

    Raises:
        ValueError: The number of mappings is not the number of samples.
    """
    indices = _indices(idx)
    result = _per_sample(result, idx, len(indices))
    results = result if isinstance(result, list) else [result]
    if len(results) != len(indices):
        raise ContractError(
            f"Contracted inference must return one mapping per input sample ({len(indices)} samples, "
            f"got {len(results)})"
        )
    outputs = [
        contract.prepare_output(value, model, idx=index, idx_key=idx_key, sample=original[index])
        for index, value in zip(indices, results)
    ]
    return outputs if isinstance(idx, (list, tuple)) else outputs[0]
