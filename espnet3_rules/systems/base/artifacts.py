"""Turning one output value into its ``<field>.scp`` text, writing artifacts atomically.

Mirrors ESPnet3's ``_materialize_output_value`` / ``write_artifact`` rules:

- ``str``/``int``/``float``/``bool`` are written inline; numpy scalars and numpy
  and torch 0-d values through ``.item()``.
- Arrays and CPU tensors become ``split.N/<field>/<utt_id>.npy`` (``.wav`` with an
  ``output_artifacts`` entry ``{"type": "wav", "sample_rate": N}``, or whatever a
  custom writer writes); the scp holds the absolute path. The suffix is appended
  to the id (``sp0.9-utt1.npy``), never replacing a dot in it.
- An ``Audio`` value (the contract's audio kind) is a wav at its own rate unless
  ``output_artifacts`` says otherwise; its ``(channels, samples)`` array is written
  as ``(samples, channels)``.
- A dict becomes ``<field>/<utt_id>.json``; any other object is pickled to ``.pkl``.
- A top-level list or tuple is a TypeError, as in ESPnet3, except a list of dicts
  (segments), which we write as ``{"<field>": [...]}`` in one JSON file.
- ``None``, ``bytes`` and text with a newline are refused (ESPnet3 pickles the
  first two and writes the third, tearing the scp line).

Values are checked (and JSON/pickle/PCM payloads built in memory) by
:func:`prepare_value` before anything is written, so a record with one bad
field writes nothing. numpy and torch are imported only for values of theirs.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from espnet3_rules.engine.contracts import ContractError, ContractTypeError, import_object
from espnet3_rules.engine.files import atomic_path

SUFFIXES = {"npy": ".npy", "wav": ".wav", "json": ".json", "pickle": ".pkl"}
ARRAY_TYPES = ("npy", "wav")
#: Files the engine keeps in ``split.N/``; a field directory of these names would collide.
RESERVED_FIELD_NAMES = frozenset({"done", "_state.pkl", "field_keys.txt", "_journal.pkl", "_journal_records.pkl"})


# ----------------------------------------------------------------- names
def unsafe_name_reason(text: str) -> Optional[str]:
    """Why ``text`` cannot head an scp line or name a file, or ``None`` if it can."""
    if not text:
        return "it is empty"
    if text in (".", ".."):
        return "it is '.' or '..'"
    if any(c.isspace() for c in text):
        return "it contains whitespace"
    if "/" in text or "\\" in text:
        return "it contains '/' or '\\'"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8 text"
    return None


def check_utt_id(value: Any, idx_key: str) -> str:
    """The utterance id as text; refuses lists, non-scalar ids and ids unsafe as file names."""
    if isinstance(value, (list, tuple)):
        raise ContractTypeError(f"{idx_key!r} must be a single value, not {type(value).__name__}: {value!r:.60}")
    if _is_numpy(value) or _is_torch_tensor(value):
        if getattr(value, "ndim", 0) != 0:
            raise ContractError(
                f"output {idx_key!r} must be a single value, not an array of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ContractError(f"output {idx_key!r} must be a str or int id, not {type(value).__name__}: {value!r:.60}")
    text = str(value)
    reason = unsafe_name_reason(text)
    if reason:
        raise ContractError(
            f"output {idx_key}={text!r} is not a safe id ({reason}): ids head scp lines and name artifact files"
        )
    return text


def check_field_name(name: Any) -> str:
    """An output field name, which names ``<field>.scp`` and the ``<field>/`` artifact folder."""
    if not isinstance(name, str):
        raise ContractError(f"output field name {name!r} must be a str, not {type(name).__name__}")
    reason = unsafe_name_reason(name)
    if reason is None and (name in RESERVED_FIELD_NAMES or name.startswith(".")):
        reason = f"it is reserved (split.N/ holds {sorted(RESERVED_FIELD_NAMES)} and hidden temp files)"
    if reason:
        raise ContractError(f"output field {name!r} cannot name <field>.scp / <field>/ ({reason})")
    return name


# ---------------------------------------------------------------- configs
@dataclass(frozen=True)
class ArtifactSpec:
    """How one field's non-scalar values are written (an ``output_artifacts`` entry, resolved)."""

    type: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)
    writer: Optional[Callable[..., Any]] = None
    writer_path: Optional[str] = None
    #: ESPnet3's ``{"writer": {"_target_": ...}}`` form: called as ``writer(value=, output_path=, **options)``.
    writer_keywords: bool = False


def resolve_artifact_configs(configs: Any, where: str = "output_artifacts") -> Dict[str, ArtifactSpec]:
    """Check ``{field: {"type": ..., ...} | {"writer": "pkg.func", ...}}`` and import writers.

    Called at plan time (``validate``) and again once per shard.
    """
    if configs is None:
        return {}
    if not isinstance(configs, Mapping):
        raise ContractError(f"{where} must map field -> artifact config, got {type(configs).__name__}")
    return {check_field_name(name): _resolve_one(name, config, f"{where}.{name}") for name, config in configs.items()}


def _resolve_one(name: str, config: Any, where: str) -> ArtifactSpec:
    if not isinstance(config, Mapping):
        raise ContractError(f"{where} must be a mapping like {{type: npy}}, got {type(config).__name__}")
    config = dict(config)
    writer_path = config.pop("writer", None)
    type_name = config.pop("type", None)
    if writer_path is not None:
        if type_name is not None:
            raise ContractError(f"{where}: give either 'type' or 'writer', not both")
        keywords = isinstance(writer_path, Mapping)
        if keywords:  # ESPnet3's form: {_target_: pkg.func, **options}
            writer_config = dict(writer_path)
            if "_target_" not in writer_config:
                raise ContractError(f"{where}.writer must name its function as _target_ (or be an import path)")
            writer_path = writer_config.pop("_target_")
            config = {**writer_config, **config}
        writer = import_object(writer_path, f"{where}.writer")
        if not callable(writer):
            raise ContractError(f"{where}.writer {writer_path!r} is not callable")
        return ArtifactSpec(options=config, writer=writer, writer_path=writer_path, writer_keywords=keywords)
    if type_name not in SUFFIXES:
        raise ContractError(f"{where}.type must be one of {sorted(SUFFIXES)} (or give a writer), got {type_name!r}")
    if type_name == "wav":
        rate = config.pop("sample_rate", None)
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise ContractError(f"{where}: type wav needs sample_rate, a positive integer (got {rate!r})")
        config_out = {"sample_rate": rate}
    else:
        config_out = {}
    if config:
        raise ContractError(f"{where}: unknown option(s) {sorted(config)} for type {type_name!r}")
    return ArtifactSpec(type=type_name, options=config_out)


# ----------------------------------------------------------- preparation
@dataclass
class PreparedValue:
    """A checked value: inline ``text``, or an artifact of ``kind`` with its ``payload``."""

    text: Optional[str] = None
    kind: Optional[str] = None
    payload: Any = None
    spec: Optional[ArtifactSpec] = None


def _module_root(value: Any) -> str:
    return type(value).__module__.split(".", 1)[0]


def _is_numpy(value: Any) -> bool:
    return _module_root(value) == "numpy"


def _is_torch_tensor(value: Any) -> bool:
    if _module_root(value) != "torch":
        return False
    import torch

    return isinstance(value, torch.Tensor)


def _inline(text: str, where: str) -> PreparedValue:
    if "\n" in text or "\r" in text:
        raise ContractError(f"{where} contains a newline; scp values must be one line (write it as a dict for JSON)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ContractError(
            f"{where} is not valid UTF-8 text ({exc.reason} at {exc.start}); fix its decoding"
        ) from None
    return PreparedValue(text=text)


def prepare_value(value: Any, field_name: str, utt_id: str, spec: Optional[ArtifactSpec] = None) -> PreparedValue:
    """Check one output value and build what will be written, writing nothing yet."""
    where = f"field {field_name!r} of {utt_id!r}"
    if isinstance(value, (str, int, float, bool)):
        return _inline(str(value), where)
    if _is_audio(value):
        value, spec = _audio_array(value, spec)
    if value is None:
        raise ContractError(f"{where} is None; return a value (an empty string for no text) or leave the key out")
    if isinstance(value, (bytes, bytearray)):
        raise ContractError(f"{where} is bytes; decode it to str (UTF-8) or return an array")
    if _is_numpy(value) or _is_torch_tensor(value):
        return _prepare_array(value, where, spec)
    if isinstance(value, Mapping):
        return _prepare_object(dict(value), where, spec, default="json")
    if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
        # segments (a list of dicts, possibly empty) are one JSON document, as in ESPnet3
        return _prepare_object({field_name: value}, where, spec, default="json")
    if isinstance(value, (list, tuple)):
        raise ContractTypeError(
            f"Top-level list outputs are not supported for {field_name!r}. Return a single value per field, "
            f"or wrap structured content in a dict so it can be saved as JSON. ({where} is a {type(value).__name__})"
        )
    return _prepare_object(value, where, spec, default="pickle")


def _is_audio(value: Any) -> bool:
    """An ``Audio`` of the contract package (ours or ESPnet3's), recognised without importing it."""
    for module in ("espnet3_rules.contract.kinds.audio", "espnet3.contract.kinds.audio"):
        audio = getattr(sys.modules.get(module), "Audio", None)
        if audio is not None and isinstance(value, audio):
            return True
    return False


def _audio_array(audio: Any, spec: Optional[ArtifactSpec]) -> Tuple[Any, ArtifactSpec]:
    """An ``Audio``'s array and how to write it: a wav at its rate unless ``output_artifacts`` says otherwise."""
    if spec is None:
        spec = ArtifactSpec(type="wav", options={"sample_rate": int(audio.rate)})
    elif spec.writer is not None and "sample_rate" not in spec.options:
        spec = replace(spec, options={**spec.options, "sample_rate": int(audio.rate)})
    array = audio.array
    wav = spec.type == "wav" or spec.writer is not None
    return (array.T if wav and array.ndim == 2 else array), spec


def _prepare_array(value: Any, where: str, spec: Optional[ArtifactSpec]) -> PreparedValue:
    """numpy/torch values: 0-d inline via ``.item()``, arrays as npy/wav/custom artifacts."""
    if _is_torch_tensor(value):
        if value.device.type != "cpu":
            raise ContractError(
                f"{where} is a tensor on {value.device}; move it to CPU (.cpu()) in forward/output_fn "
                "before returning it"
            )
        if value.dim() == 0:
            return _inline_scalar(value.item(), where)
    elif getattr(value, "ndim", 0) == 0:  # numpy scalar or 0-d array
        return _inline_scalar(value.item(), where)
    if spec is not None and spec.writer is not None:
        return PreparedValue(kind="writer", payload=value, spec=spec)
    type_name = spec.type if spec is not None else "npy"
    if type_name not in ARRAY_TYPES and type_name != "pickle":
        raise ContractError(f"{where} is an array; output_artifacts type {type_name!r} cannot hold it (use npy or wav)")
    if type_name == "pickle":
        return PreparedValue(kind="pickle", payload=_pickled(value, where), spec=spec)
    import numpy as np

    try:
        array = np.asarray(value.detach().numpy() if _is_torch_tensor(value) else value)
    except TypeError as exc:  # e.g. bfloat16 has no numpy dtype
        raise ContractError(f"{where} cannot be converted to numpy ({exc}); cast it (e.g. .float()) first") from None
    if array.dtype.hasobject:
        raise ContractError(f"{where} is an object-dtype array; return a numeric array or a dict (saved as JSON)")
    if type_name == "wav":
        return PreparedValue(kind="wav", payload=_to_pcm16(array, where), spec=spec)
    return PreparedValue(kind="npy", payload=array, spec=spec)


def _inline_scalar(item: Any, where: str) -> PreparedValue:
    if isinstance(item, (bytes, bytearray)):
        raise ContractError(f"{where} is a bytes scalar; decode it to str (UTF-8)")
    return _inline(str(item), where)


def _prepare_object(value: Any, where: str, spec: Optional[ArtifactSpec], default: str) -> PreparedValue:
    """Dicts (JSON by default) and other objects (pickle by default)."""
    if spec is not None and spec.writer is not None:
        return PreparedValue(kind="writer", payload=value, spec=spec)
    type_name = spec.type if spec is not None else default
    if type_name == "json":
        try:
            text = json.dumps(value, ensure_ascii=False, indent=2)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"{where} cannot be saved as JSON ({exc}); use plain dicts/lists/str/numbers") from None
        try:
            return PreparedValue(kind="json", payload=(text + "\n").encode("utf-8"), spec=spec)
        except UnicodeEncodeError as exc:
            raise ContractError(
                f"{where} holds text that is not valid UTF-8 ({exc.reason}); fix its decoding"
            ) from None
    if type_name == "pickle":
        return PreparedValue(kind="pickle", payload=_pickled(value, where), spec=spec)
    raise ContractError(
        f"{where} is a {type(value).__name__}; output_artifacts type {type_name!r} is for arrays (use json or pickle)"
    )


def _pickled(value: Any, where: str) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is the value's fault
        raise ContractError(f"{where} ({type(value).__name__}) cannot be pickled: {exc}") from None


def _to_pcm16(array: Any, where: str) -> Any:
    """A float ([-1, 1], clipped) or int16 waveform of shape (samples,) or (samples, channels) as int16."""
    import numpy as np

    if array.ndim not in (1, 2) or array.shape[0] == 0:
        raise ContractError(
            f"{where}: wav needs a non-empty (samples,) or (samples, channels) array, got shape {array.shape}"
        )
    if array.ndim == 2 and array.shape[1] > array.shape[0]:
        raise ContractError(
            f"{where}: wav array of shape {array.shape} looks channels-first; give (samples, channels)"
        )
    if array.dtype == np.int16:
        return array.astype("<i2", copy=False)
    if not np.issubdtype(array.dtype, np.floating):
        raise ContractError(f"{where}: wav needs a float waveform in [-1, 1] or int16 samples, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ContractError(f"{where}: wav waveform holds NaN or inf")
    return np.round(np.clip(array, -1.0, 1.0) * 32767.0).astype("<i2")


# ---------------------------------------------------------------- writing
def write_prepared(prepared: PreparedValue, field_dir: Path, utt_id: str) -> str:
    """The scp text of a prepared value: itself, or the absolute path of the artifact written."""
    if prepared.text is not None:
        return prepared.text
    if prepared.kind == "writer":
        path = _run_writer(prepared, field_dir / utt_id)
    else:
        path = field_dir / f"{utt_id}{SUFFIXES[prepared.kind]}"
        with atomic_path(path) as tmp:
            _write_builtin(prepared, tmp)
    text = path.resolve().as_posix()
    if "\n" in text or "\r" in text:
        raise ContractError(f"artifact path {text!r} contains a newline; it cannot be an scp value")
    return text


def _write_builtin(prepared: PreparedValue, tmp: Path) -> None:
    if prepared.kind == "npy":
        import numpy as np

        with tmp.open("wb") as f:
            np.save(f, prepared.payload, allow_pickle=False)
    elif prepared.kind == "wav":
        import wave

        pcm = prepared.payload
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
            w.setsampwidth(2)
            w.setframerate(prepared.spec.options["sample_rate"])
            w.writeframes(pcm.tobytes())
    else:  # json / pickle: bytes built by prepare_value
        tmp.write_bytes(prepared.payload)


def _run_writer(prepared: PreparedValue, path_without_suffix: Path) -> Path:
    """Call a custom ``writer(value, path_without_suffix, **options)``; it must return an existing file."""
    spec = prepared.spec
    path_without_suffix.parent.mkdir(parents=True, exist_ok=True)
    if spec.writer_keywords:
        result = spec.writer(value=prepared.payload, output_path=path_without_suffix, **spec.options)
    else:
        result = spec.writer(prepared.payload, path_without_suffix, **spec.options)
    if not isinstance(result, (str, os.PathLike)):
        raise ContractError(
            f"artifact writer {spec.writer_path} returned {type(result).__name__}, not the written path"
        )
    path = Path(result)
    if not path.is_file():
        raise ContractError(f"artifact writer {spec.writer_path} returned {str(path)!r}, which is not an existing file")
    return path
