"""InferenceRunner: writer-style runner streaming each output field to ``<field>.scp``.

Mirrors ``espnet3.systems.base.inference_runner.InferenceRunner``: ``forward``
feeds ``dataset[idx][input_key]`` to the model (optionally through
``output_fn``); each result is a dict with an id (``idx_key``) and fields; each
field goes to ``split.N/<field>.scp`` as ``<id> <value>``; ``merge``
concatenates each field's scp across shards in shard-id order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .base_runner import BaseRunner, concatenate_shard_files
from .contracts import ContractError, import_object

FIELD_KEYS_NAME = "field_keys.txt"


def as_key_list(keys: Any) -> List[str]:
    """``None`` -> ``[]``, a string -> ``[it]``, a sequence -> list."""
    if keys is None:
        return []
    if isinstance(keys, str):
        return [keys]
    return list(keys)


def iter_outputs(result: Any) -> Iterable[Any]:
    """Flatten (nested) lists of results, as batched ``forward`` returns them."""
    if isinstance(result, list):
        for item in result:
            yield from iter_outputs(item)
    else:
        yield result


def check_utt_id(value: Any, idx_key: str) -> str:
    """The id as text; refuses lists and ids unsafe as scp keys or file names."""
    if isinstance(value, (list, tuple)):
        raise ContractError(f"output {idx_key!r} must be a single value, not a {type(value).__name__}")
    text = str(value)
    if not text or text in (".", "..") or any(c.isspace() for c in text) or "/" in text or "\\" in text:
        raise ContractError(
            f"output {idx_key}={text!r} is not a safe id: it must be non-empty, not '.'/'..', "
            "and contain no whitespace, '/' or '\\'"
        )
    return text


def write_npy_atomic(array: Any, path: Path) -> Path:
    """Save an array as ``.npy`` through a temp file and rename."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
    return path


def scp_value(utt_id: str, field: str, value: Any, shard_dir: Path) -> str:
    """The text written after the id in ``<field>.scp`` (arrays become ``.npy`` paths)."""
    if isinstance(value, (str, int, float, bool)):
        text = str(value)
    elif isinstance(value, Mapping):
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    elif isinstance(value, (list, tuple)):
        raise ContractError(
            f"field {field!r} of {utt_id!r} is a top-level {type(value).__name__}; return one value per "
            "field, an array, or a dict (saved as JSON)"
        )
    elif hasattr(value, "ndim") and hasattr(value, "shape"):
        if getattr(value, "is_cuda", False):
            raise ContractError(f"field {field!r} of {utt_id!r} is a CUDA tensor; move it to CPU (.cpu()) in forward")
        if value.ndim == 0:
            text = str(value.item())
        else:
            array = value.numpy() if hasattr(value, "numpy") else value
            text = write_npy_atomic(array, shard_dir / field / f"{utt_id}.npy").resolve().as_posix()
    elif hasattr(value, "item") and callable(value.item):
        text = str(value.item())
    else:
        raise ContractError(
            f"field {field!r} of {utt_id!r} has unsupported type {type(value).__name__}; "
            "use str/int/float/bool, an array or tensor, or a dict"
        )
    if "\n" in text or "\r" in text:
        raise ContractError(f"field {field!r} of {utt_id!r} contains a newline; scp values must be one line")
    return text


class InferenceRunner(BaseRunner):
    """Inference runner writing one ``<field>.scp`` per output field.

    Args:
        provider: Provider of ``dataset`` and ``model`` (usually an InferenceProvider).
        idx_key: Output key holding the utterance id (first scp column).
        output_keys: Fields to write; default every key but the id.
        input_key: Dataset item key(s) fed to ``model`` by the default ``forward``.
        output_fn: Import path of ``output_fn(data=, model_output=, idx=)`` that
            turns model output into result dict(s).
        model_kwargs: Extra keyword arguments for the model call.
        **kwargs: BaseRunner arguments (``output_dir``, ``batch_size``, ...).
    """

    def __init__(
        self,
        provider: Any,
        idx_key: str = "utt_id",
        output_keys: Optional[Sequence[str] | str] = None,
        input_key: Optional[Sequence[str] | str] = None,
        output_fn: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ):
        """Keep the output/input key settings."""
        super().__init__(provider, **kwargs)
        self.idx_key = idx_key
        self.output_keys = as_key_list(output_keys) or None
        self.input_key = input_key
        self.output_fn = output_fn
        self.model_kwargs = dict(model_kwargs or {})

    def runner_kwargs(self) -> Dict[str, Any]:
        """Output/input settings, recorded in the plan."""
        return {
            "idx_key": self.idx_key,
            "output_keys": self.output_keys,
            "input_key": self.input_key,
            "output_fn": self.output_fn,
            "model_kwargs": self.model_kwargs,
        }

    def runtime_env(self, env: Dict[str, Any]) -> Dict[str, Any]:
        """Expose the settings to the static hooks (provider params win)."""
        env = super().runtime_env(env)
        env.setdefault("idx_key", self.idx_key)
        env.setdefault("output_keys", self.output_keys)
        if self.input_key is not None:
            env.setdefault("input_key", self.input_key)
        if self.output_fn is not None:
            env.setdefault("output_fn_path", self.output_fn)
        if self.model_kwargs:
            env.setdefault("model_kwargs", self.model_kwargs)
        return env

    def validate(self) -> None:
        """Also resolve ``output_fn`` at plan time."""
        super().validate()
        if self.output_fn is not None:
            import_object(self.output_fn, "output_fn")

    @staticmethod
    def forward(idx: Any, dataset: Any = None, model: Any = None, **env: Any) -> Any:
        """Feed ``dataset[idx][input_key]`` to ``model``; lists per key for a batch."""
        input_key = env.get("input_key")
        if input_key is None:
            raise ContractError("InferenceRunner.forward needs input_key (runner option or provider param)")
        keys = as_key_list(input_key)
        output_fn = env.get("output_fn")
        if output_fn is None and env.get("output_fn_path"):
            output_fn = import_object(env["output_fn_path"], "output_fn")
        model_kwargs = dict(env.get("model_kwargs") or {})
        batched = isinstance(idx, (list, tuple))
        data = [dataset[i] for i in idx] if batched else dataset[idx]
        items = data if batched else [data]
        for key in keys:
            for item in items:
                if key not in item:
                    raise ContractError(f"input_key {key!r} not found in dataset item (keys: {sorted(item)})")
        inputs = {key: [item[key] for item in items] if batched else data[key] for key in keys}
        model_output = model(**inputs, **model_kwargs)
        if output_fn is None:
            return model_output
        return output_fn(data=data, model_output=model_output, idx=list(idx) if batched else idx)

    @staticmethod
    def open_writers(shard_dir: Optional[Path], **env: Any) -> Dict[str, Any]:
        """Lazily opened ``<field>.scp`` handles and the set of fields seen."""
        return {"shard_dir": Path(shard_dir), "scp_handles": {}, "field_keys": []}

    @staticmethod
    def write_record(
        writers: Dict[str, Any],
        result: Any,
        state: Dict[str, Any],
        idx_key: str = "utt_id",
        output_keys: Optional[Sequence[str]] = None,
        **env: Any,
    ) -> None:
        """Validate each output dict, then append ``<id> <value>`` to each field's scp."""
        shard_dir = writers["shard_dir"]
        required = as_key_list(output_keys)
        for output in iter_outputs(result):
            if not isinstance(output, Mapping):
                raise ContractError(
                    f"InferenceRunner result must be a dict (or a list of dicts), got {type(output).__name__}: {output!r:.80}"
                )
            if idx_key not in output:
                raise ContractError(f"InferenceRunner result has no id key {idx_key!r} (keys: {sorted(output)})")
            utt_id = check_utt_id(output[idx_key], idx_key)
            missing = [k for k in required if k not in output]
            if missing:
                raise ContractError(f"result {utt_id!r} lacks output keys {missing} (keys: {sorted(output)})")
            fields = required or [k for k in output if k != idx_key]
            lines = {field: scp_value(utt_id, field, output[field], shard_dir) for field in fields}
            for field, text in lines.items():
                handle = writers["scp_handles"].get(field)
                if handle is None:
                    handle = (shard_dir / f"{field}.scp").open("w", encoding="utf-8")
                    writers["scp_handles"][field] = handle
                    writers["field_keys"].append(field)
                handle.write(f"{utt_id} {text}\n")

    @staticmethod
    def close_writers(writers: Dict[str, Any], state: Optional[Dict[str, Any]] = None, **env: Any) -> Dict[str, Any]:
        """Close scp files and write ``field_keys.txt`` (fields in first-seen order)."""
        for handle in writers["scp_handles"].values():
            handle.close()
        keys = writers["field_keys"]
        (writers["shard_dir"] / FIELD_KEYS_NAME).write_text("".join(f"{k}\n" for k in keys), encoding="utf-8")
        return {"field_keys": list(keys)}

    def merge(self, shard_dirs: List[Path]) -> Dict[str, Any]:
        """Concatenate each field's scp across shards into ``output_dir/shard_subdir``.

        Fields are the union of every shard's ``field_keys.txt`` in first-seen
        order. An id that appears in two shards is an error.
        """
        fields: List[str] = []
        for shard_dir in shard_dirs:
            for key in (Path(shard_dir) / FIELD_KEYS_NAME).read_text(encoding="utf-8").split():
                if key not in fields:
                    fields.append(key)
        if not fields:
            raise ContractError(f"no output fields in any shard of {self._root()}: forward returned nothing to write")
        check_unique_ids(shard_dirs, fields[0])
        outputs = {}
        for field in fields:
            out_path = self._root() / f"{field}.scp"
            concatenate_shard_files(shard_dirs, f"{field}.scp", out_path)
            outputs[field] = str(out_path)
        return outputs

    def _root(self) -> Path:
        return self.output_dir / self.shard_subdir if self.shard_subdir else self.output_dir


def check_unique_ids(shard_dirs: Sequence[Path], field: str) -> None:
    """Refuse an id that appears twice in ``<field>.scp`` across shards."""
    seen: Dict[str, str] = {}
    for shard_dir in shard_dirs:
        path = Path(shard_dir) / f"{field}.scp"
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as f:
            for line in f:
                utt_id = line.split(" ", 1)[0].rstrip("\n")
                if utt_id in seen:
                    raise ContractError(f"id {utt_id!r} appears in both {seen[utt_id]} and {path}; ids must be unique")
                seen[utt_id] = str(path)
