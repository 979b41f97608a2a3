"""InferenceRunner: writer-style runner streaming each output field to ``<field>.scp``.

At ESPnet3's path (``espnet3.systems.base.inference_runner``; its plain-model
path): ``forward`` feeds ``dataset[idx][input_key]`` to the model (plus
``model_kwargs``), optionally through ``output_fn(data=, model_output=, idx=)``;
each result is a dict with an id (``idx_key``) and fields; each field goes to
``split.N/<field>.scp`` as ``<id> <value>`` (values per :mod:`.artifacts`);
``merge`` concatenates each field's scp across shards in shard-id order.

A batch that fails for any reason but running out of memory is retried one item
at a time (a model that takes no lists still works with ``batch_size`` set); an
out-of-memory batch is an error naming its items and their input lengths.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from espnet3_rules.systems.base.artifacts import (
    ArtifactSpec,
    PreparedValue,
    check_field_name,
    check_utt_id,
    prepare_value,
    resolve_artifact_configs,
    write_prepared,
)
from espnet3_rules.engine.files import atomic_path, concatenate_to_temp
from espnet3_rules.engine.job import shard_root
from espnet3_rules.parallel.base_runner import BaseRunner
from espnet3_rules.engine.contracts import ContractError, import_object

log = logging.getLogger(__name__)

FIELD_KEYS_NAME = "field_keys.txt"

#: Model classes already reported as not taking a batch (one warning per class, not per batch).
_WARNED_UNBATCHED: Set[str] = set()


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


# ------------------------------------------------------------------ forward
def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError``, ``MemoryError``, and errors saying "out of memory"."""
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch") for cls in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def input_lengths(inputs: Mapping[str, List[Any]]) -> Dict[str, List[Optional[int]]]:
    """Per input key, each item's length (first dimension, or ``len``) for error messages."""

    def length(value: Any) -> Optional[int]:
        shape = getattr(value, "shape", None)
        if shape is not None:
            return int(shape[0]) if len(shape) else None
        try:
            return len(value)
        except TypeError:
            return None

    return {key: [length(v) for v in values] for key, values in inputs.items()}


def model_inputs(items: Sequence[Any], keys: Sequence[str], indices: Sequence[Any]) -> Dict[str, List[Any]]:
    """``{key: [item[key] for item in items]}``; a missing key names the dataset index."""
    for item, index in zip(items, indices):
        if not isinstance(item, Mapping):
            raise ContractError(f"dataset[{index!r}] is a {type(item).__name__}; input_key needs dict items")
        for key in keys:
            if key not in item:
                raise ContractError(f"input_key {key!r} not found in dataset[{index!r}] (keys: {sorted(item)})")
    return {key: [item[key] for item in items] for key in keys}


def _call_model(model: Any, inputs: Dict[str, Any], env: Mapping[str, Any], data: Any, idx: Any) -> Any:
    """``model(**inputs, **model_kwargs)``, shaped by ``output_fn`` when one is set."""
    model_output = model(**inputs, **env["model_kwargs"])
    output_fn = env["output_fn"]
    return model_output if output_fn is None else output_fn(data=data, model_output=model_output, idx=idx)


def _forward_env(env: Mapping[str, Any]) -> Dict[str, Any]:
    """Checked ``input_key`` list, ``output_fn`` callable (or None) and ``model_kwargs`` dict."""
    keys = as_key_list(env.get("input_key"))
    if not keys:
        raise ContractError("InferenceRunner.forward needs input_key (runner option or provider param)")
    output_fn = env.get("output_fn") or env.get("output_fn_path")
    if isinstance(output_fn, str):
        output_fn = import_object(output_fn, "output_fn")
    model_kwargs = env.get("model_kwargs") or {}
    if not isinstance(model_kwargs, Mapping):
        raise ContractError(f"model_kwargs must be a mapping, got {type(model_kwargs).__name__}")
    return {"keys": keys, "output_fn": output_fn, "model_kwargs": dict(model_kwargs)}


def forward_batch(indices: List[Any], dataset: Any, model: Any, env: Mapping[str, Any]) -> Any:
    """Run a batch; on OOM raise advice, on any other error retry the items one at a time."""
    items = [dataset[i] for i in indices]
    inputs = model_inputs(items, env["keys"], indices)
    try:
        return _call_model(model, inputs, env, items, indices)
    except Exception as exc:  # noqa: BLE001 - classified below
        if is_out_of_memory(exc):
            raise ContractError(
                f"batch of {len(indices)} items (dataset indices {indices}, input lengths {input_lengths(inputs)}) "
                f"ran out of memory ({type(exc).__name__}: {str(exc)[:200]}); lower batch_size below "
                f"{len(indices)} or sort the test set by length"
            ) from exc
        batch_exc = exc
    results = []
    for index, item in zip(indices, items):
        single = {key: item[key] for key in env["keys"]}
        try:
            results.append(_call_model(model, single, env, item, index))
        except Exception as exc:  # noqa: BLE001 - reported with both causes
            raise ContractError(
                f"batch {indices} failed ({type(batch_exc).__name__}: {str(batch_exc)[:200]}) and dataset[{index!r}] "
                f"alone failed too ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
    _warn_unbatched(model, len(indices), batch_exc)
    return results


def _warn_unbatched(model: Any, n: int, exc: BaseException) -> None:
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    if name in _WARNED_UNBATCHED:
        return
    _WARNED_UNBATCHED.add(name)
    log.warning(
        "%s (or output_fn) did not accept a batch of %d items (%s: %.200s); the items were run one at a time. "
        "Set batch_size to null to skip the failed attempt, or make the model and output_fn accept lists.",
        name,
        n,
        type(exc).__name__,
        exc,
    )


# ------------------------------------------------------------------ writing
def prepare_record(
    output: Any, idx_key: str, required: Sequence[str], artifacts: Mapping[str, ArtifactSpec]
) -> Tuple[str, List[Tuple[str, PreparedValue]]]:
    """Validate one result dict completely: ``(utt_id, [(field, PreparedValue), ...])``, nothing written."""
    if not isinstance(output, Mapping):
        raise ContractError(
            f"InferenceRunner result must be a dict (or a list of dicts), got {type(output).__name__}: {output!r:.80}"
        )
    if idx_key not in output:
        raise ContractError(f"InferenceRunner result has no id key {idx_key!r} (keys: {sorted(map(str, output))})")
    utt_id = check_utt_id(output[idx_key], idx_key)
    missing = [k for k in required if k not in output]
    if missing:
        raise ContractError(f"result {utt_id!r} lacks output keys {missing} (keys: {sorted(map(str, output))})")
    fields = list(required) or [k for k in output if k != idx_key]
    prepared = [
        (check_field_name(name), prepare_value(output[name], name, utt_id, artifacts.get(name))) for name in fields
    ]
    return utt_id, prepared


class InferenceRunner(BaseRunner):
    """Inference runner writing one ``<field>.scp`` per output field.

    Args:
        provider: Provider of ``dataset`` and ``model`` (usually an InferenceProvider).
        idx_key: Output key holding the utterance id (first scp column).
        output_keys: Fields to write (each result must have them); default every key but the id.
        input_key: Dataset item key(s) fed to ``model`` by the default ``forward``.
        output_fn: Import path of ``output_fn(data=, model_output=, idx=)`` that
            turns model output into result dict(s).
        model_kwargs: Extra keyword arguments for the model call.
        output_artifacts: Per field, how non-scalar values are written:
            ``{"type": "npy"}`` (arrays' default), ``{"type": "wav", "sample_rate": 16000}``,
            ``{"type": "json"}`` / ``{"type": "pickle"}``, or ``{"writer": "pkg.mod.func"}``
            called as ``func(value, path_without_suffix, **other_keys)`` -> written path.
        hyp_key: Hypothesis key(s), as ESPnet3's ``infer()`` passes them (kept; not yet checked when writing).
        ref_key: Reference key(s), likewise.
        **kwargs: BaseRunner arguments (``output_dir``, ``batch_size``, ...).

    The static hooks read these settings from the env, as ESPnet3's do: a provider
    param of the same name (as ESPnet3's ``infer()`` passes them) wins over the option.
    """

    def __init__(
        self,
        provider: Any,
        idx_key: str = "utt_id",
        output_keys: Optional[Sequence[str] | str] = None,
        input_key: Optional[Sequence[str] | str] = None,
        output_fn: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        output_artifacts: Optional[Mapping[str, Mapping[str, Any]]] = None,
        hyp_key: Sequence[str] | str = "hyp",
        ref_key: Sequence[str] | str = "ref",
        **kwargs: Any,
    ):
        """Keep the settings and check them (``output_fn`` importable, artifact writers, ``input_key`` given)."""
        super().__init__(provider, **kwargs)
        if not isinstance(idx_key, str) or not idx_key:
            raise ContractError(f"idx_key must be a non-empty string, got {idx_key!r}")
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
            raise ContractError(f"model_kwargs must be a mapping, got {type(model_kwargs).__name__}")
        self.idx_key = idx_key
        self.output_keys = [check_field_name(k) for k in as_key_list(output_keys)] or None
        self.input_key = input_key
        self.output_fn = output_fn
        self.model_kwargs = dict(model_kwargs or {})
        self.output_artifacts = output_artifacts or None
        self.hyp_key = hyp_key if isinstance(hyp_key, str) else list(hyp_key)
        self.ref_key = ref_key if isinstance(ref_key, str) else list(ref_key)
        if output_fn is not None and not callable(import_object(output_fn, "output_fn")):
            raise ContractError(f"output_fn {output_fn!r} is not callable")
        resolve_artifact_configs(output_artifacts)
        params = getattr(provider, "params", None)  # an InferenceProvider's env is exactly dataset, model, params
        default_forward = type(self).forward is InferenceRunner.forward
        if isinstance(params, Mapping) and default_forward and input_key is None and "input_key" not in params:
            raise ContractError(
                f"{type(self).__name__} needs input_key (runner_kwargs or provider params): the dataset item "
                "key(s) fed to the model"
            )

    @staticmethod
    def forward(idx: Any, dataset: Any = None, model: Any = None, **env: Any) -> Any:
        """Feed ``dataset[idx][input_key]`` to ``model``; lists per key for a batch."""
        checked = _forward_env(env)
        if isinstance(idx, (list, tuple)):
            return forward_batch(list(idx), dataset, model, checked)
        data = dataset[idx]
        inputs = {key: values[0] for key, values in model_inputs([data], checked["keys"], [idx]).items()}
        return _call_model(model, inputs, checked, data, idx)

    @staticmethod
    def open_writers(
        shard_dir: Optional[Path], output_artifacts: Optional[Mapping[str, Any]] = None, **env: Any
    ) -> Dict[str, Any]:
        """Lazily opened ``<field>.scp`` handles, the fields seen, the resolved artifact writers."""
        return {
            "shard_dir": Path(shard_dir),
            "artifacts": resolve_artifact_configs(output_artifacts),
            "scp_handles": {},
            "field_keys": [],
        }

    @staticmethod
    def write_record(
        writers: Dict[str, Any],
        result: Any,
        state: Dict[str, Any],
        idx_key: str = "utt_id",
        output_keys: Optional[Sequence[str]] = None,
        **env: Any,
    ) -> None:
        """Validate each output dict fully, write its artifacts, then append ``<id> <value>`` lines."""
        shard_dir = writers["shard_dir"]
        required = as_key_list(output_keys)
        for output in iter_outputs(result):
            utt_id, prepared = prepare_record(output, idx_key, required, writers["artifacts"])
            lines = [(name, write_prepared(value, shard_dir / name, utt_id)) for name, value in prepared]
            for name, text in lines:
                handle = writers["scp_handles"].get(name)
                if handle is None:
                    handle = (shard_dir / f"{name}.scp").open("w", encoding="utf-8")
                    writers["scp_handles"][name] = handle
                    writers["field_keys"].append(name)
                handle.write(f"{utt_id} {text}\n")

    @staticmethod
    def close_writers(writers: Dict[str, Any], state: Optional[Dict[str, Any]] = None, **env: Any) -> Dict[str, Any]:
        """Close scp files and write ``field_keys.txt`` (fields in first-seen order)."""
        for handle in writers["scp_handles"].values():
            handle.close()
        keys = writers["field_keys"]
        with atomic_path(writers["shard_dir"] / FIELD_KEYS_NAME) as tmp:
            tmp.write_text("".join(f"{k}\n" for k in keys), encoding="utf-8")
        return {"field_keys": list(keys)}

    def merge(self, shard_dirs: List[Path]) -> Dict[str, str]:
        """Concatenate each field's scp across shards into ``output_dir/shard_subdir``.

        Fields are the union of every shard's ``field_keys.txt`` in first-seen
        order; a field's fragment is taken only from shards that list it. Every
        field's ids are checked unique across shards before any merged file is in
        place: the concatenation runs meanwhile in a thread, into temp files that
        are renamed onto ``<field>.scp`` only once every check has passed (and
        removed if one fails). The merged files are not fsynced (see
        :func:`~espnet3_rules.parallel.base_runner.concatenate_shard_files`).
        """
        shard_fields = [read_field_keys(Path(d)) for d in shard_dirs]
        fields: List[str] = []
        for keys in shard_fields:
            fields.extend(k for k in keys if k not in fields)
        if not fields:
            raise ContractError(f"no output fields in any shard of {self._root()}: forward returned nothing to write")
        sources = {field: [Path(d) for d, keys in zip(shard_dirs, shard_fields) if field in keys] for field in fields}
        out_paths = {field: self._root() / f"{field}.scp" for field in fields}
        failed = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-copy") as pool:
            copies = {
                field: pool.submit(concatenate_to_temp, [d / f"{field}.scp" for d in dirs], out_paths[field], failed.is_set)
                for field, dirs in sources.items()
            }
            try:
                for field, dirs in sources.items():
                    check_unique_ids(dirs, field)
                temps = {field: copy.result() for field, copy in copies.items()}
            except BaseException:  # a check or a copy failed: no temp file stays behind
                failed.set()
                for copy in copies.values():
                    if not copy.cancel() and copy.exception() is None:
                        copy.result().unlink(missing_ok=True)
                raise
        for field, tmp in temps.items():
            os.replace(tmp, out_paths[field])
        return {field: str(path) for field, path in out_paths.items()}

    def _root(self) -> Path:
        return shard_root(self.output_dir, self.shard_subdir)


def read_field_keys(shard_dir: Path) -> List[str]:
    """The fields a finished shard wrote (its ``field_keys.txt``)."""
    path = shard_dir / FIELD_KEYS_NAME
    try:
        return path.read_text(encoding="utf-8").split()
    except FileNotFoundError:
        raise ContractError(
            f"{path} is missing: the shard did not finish through InferenceRunner.close_writers"
        ) from None


#: Bytes read at a time by :func:`check_unique_ids`.
ID_BLOCK = 1 << 24
#: A line's id, as the ``findall`` group after the newline that ends the line before it.
_NEXT_ID = re.compile(rb"\n([^ \n]*)")


class _Suspect(Exception):
    """The fast pass of :func:`check_unique_ids` found a problem; the exact pass names it."""


def iter_id_blocks(path: Path, block_size: int = ID_BLOCK) -> Iterator[List[bytes]]:
    """Per ``block_size`` bytes read, the ids of the lines that end in them, in file order.

    A line's id is its text up to the first space (the whole line if it has none),
    as bytes. A line split across two reads belongs to the later one. Raises
    :class:`_Suspect` if the file is missing or its last line has no newline.
    """
    try:
        handle = Path(path).open("rb")
    except FileNotFoundError:
        raise _Suspect(path) from None
    with handle:
        tail: List[bytes] = []  # a line's start, read before the block holding its newline
        while True:
            block = handle.read(block_size)
            if not block:
                break
            first = block.find(b"\n")
            if first < 0:
                tail.append(block)
                continue
            last = block.rfind(b"\n")
            head = b"".join([*tail, block[:first]]) if tail else block[:first]
            ids = _NEXT_ID.findall(block, first, last)  # the lines after the first, up to the last newline
            ids.insert(0, head.split(b" ", 1)[0])
            tail = [block[last + 1 :]] if last + 1 < len(block) else []
            yield ids
        if tail:
            raise _Suspect(path)


def check_unique_ids(shard_dirs: Sequence[Path], field: str, block_size: int = ID_BLOCK) -> None:
    """Refuse a missing ``<field>.scp`` fragment, a torn last line or an id that appears twice.

    A fast pass reads the fragments in large blocks and takes each line's id with
    one ``re.findall`` per block. Ids strictly increasing within every block, with
    the blocks' id ranges disjoint (sorted, contiguously sharded data: the usual
    Kaldi/ESPnet case), are unique without further work; otherwise the ids go into
    one set of bytes. Only if that pass finds a problem does the exact pass
    (:func:`_check_unique_ids_exact`) read every line again to name the file and
    line or the id and both files.
    """
    paths = [Path(d) / f"{field}.scp" for d in shard_dirs]
    try:
        if not _ids_sorted_and_disjoint(paths, block_size):
            _ids_unique_by_set(paths, block_size)
    except _Suspect:
        _check_unique_ids_exact(shard_dirs, field)


def _ids_sorted_and_disjoint(paths: Sequence[Path], block_size: int) -> bool:
    """True if each block's ids strictly increase and no two blocks' ``[first, last]`` ranges meet."""
    spans = []
    for path in paths:
        for ids in iter_id_blocks(path, block_size):
            if not all(map(operator.lt, ids, islice(ids, 1, None))):
                return False
            spans.append((ids[0], ids[-1]))
    spans.sort()
    return all(end < start for (_, end), (start, _) in zip(spans, islice(spans, 1, None)))


def _ids_unique_by_set(paths: Sequence[Path], block_size: int) -> None:
    """Raise :class:`_Suspect` at the first block that repeats an id."""
    seen: Set[bytes] = set()
    for path in paths:
        for ids in iter_id_blocks(path, block_size):
            before = len(seen)
            seen.update(ids)
            if len(seen) - before != len(ids):
                raise _Suspect(path)


def _check_unique_ids_exact(shard_dirs: Sequence[Path], field: str) -> None:
    """Stream ``<field>.scp`` of each shard line by line; refuse a missing fragment, a torn last line or a repeated id."""
    seen: Dict[str, int] = {}  # id -> position of the shard it appeared in
    for position, shard_dir in enumerate(shard_dirs):
        path = shard_dir / f"{field}.scp"
        try:
            handle = path.open(encoding="utf-8", newline="\n")
        except FileNotFoundError:
            raise ContractError(f"{path} is missing although {shard_dir / FIELD_KEYS_NAME} lists {field!r}") from None
        with handle:
            for number, line in enumerate(handle, 1):
                if not line.endswith("\n"):
                    raise ContractError(f"{path}:{number}: last line has no newline (torn write); rerun that shard")
                utt_id = line.split(" ", 1)[0].rstrip("\n")
                first = seen.get(utt_id)
                if first is not None:
                    other = shard_dirs[first] / f"{field}.scp"
                    where = f"twice in {path}" if first == position else f"in both {other} and {path}"
                    raise ContractError(f"id {utt_id!r} appears {where}; ids must be unique")
                seen[utt_id] = position
