"""InferenceRunner: writer-style runner streaming each output field to ``<field>.scp``.

At ESPnet3's path (``espnet3.systems.base.inference_runner``), with ESPnet3's
flow: the class-method ``forward`` feeds ``dataset[idx][input_key]`` (lists for a
batch) through ``cls.prepare_model_inputs`` to the model (plus ``model_kwargs``),
then ``output_fn(data=, model_output=, idx=)`` (legacy) or the inference contract,
and ``cls.format_output``; ``write_record`` checks each result dict (id key,
``hyp_key``/``ref_key``) and appends ``<id> <value>`` to ``split.N/<field>.scp``
(values per :mod:`.artifacts`); ``merge`` concatenates each field's scp across
shards in shard-id order and returns None; ``runner(indices)`` returns True.

A failing batch raises the model's own exception (a batch that ran out of memory:
a RuntimeError naming its items and input lengths); ``retry_items_on_batch_error``
asks to run a failed batch's items one at a time instead.
"""

from __future__ import annotations

import inspect
import logging
import operator
import os
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

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
from espnet3_rules.engine.contracts import (
    ContractError,
    ContractKeyError,
    ContractRuntimeError,
    ContractTypeError,
    import_object,
)

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


def input_lengths(inputs: Any) -> Dict[str, List[Optional[int]]]:
    """Per batched input key, each item's length (first dimension, or ``len``) for error messages."""

    def length(value: Any) -> Optional[int]:
        shape = getattr(value, "shape", None)
        if shape is not None:
            return int(shape[0]) if len(shape) else None
        try:
            return len(value)
        except TypeError:
            return None

    if not isinstance(inputs, Mapping):
        return {}
    return {key: [length(v) for v in values] for key, values in inputs.items() if isinstance(values, list)}


def forward_input_keys(env: Mapping[str, Any]) -> List[str]:
    """The ``input_key`` list of a ``forward`` call; RuntimeError without one, as ESPnet3."""
    keys = as_key_list(env.get("input_key"))
    if not keys:
        raise ContractRuntimeError(
            "input_key must be provided for inference (a runner option or provider param naming the dataset "
            "item key(s) fed to the model)"
        )
    return keys


def checked_model_kwargs(model_kwargs: Any) -> Dict[str, Any]:
    """``model_kwargs`` (a runner option or env entry) as a dict; TypeError for a non-mapping, as ESPnet3."""
    model_kwargs = model_kwargs or {}
    if not isinstance(model_kwargs, Mapping):
        raise ContractTypeError(f"model_kwargs must be a mapping when provided, got {type(model_kwargs).__name__}")
    return dict(model_kwargs)


def forward_output_fn(env: Mapping[str, Any]) -> Optional[Callable[..., Any]]:
    """``output_fn`` (a callable or an import path), else ``output_fn_path`` as ``infer()`` passes it; or None."""
    output_fn = env.get("output_fn") or env.get("output_fn_path") or None
    return import_object(output_fn, "output_fn") if isinstance(output_fn, str) else output_fn


def forward_contract(env: Mapping[str, Any]) -> Any:
    """The env's ``inference_contract`` resolved (``espnet3_rules.contract`` imported only then), or None."""
    if env.get("inference_contract") is None:
        return None
    if env.get("output_fn") or env.get("output_fn_path"):
        raise ContractError("output_fn cannot be combined with an inference contract (inference_contract is set)")
    from espnet3_rules.contract.inference import resolve_inference_contract

    return resolve_inference_contract(env["inference_contract"], env.get("inference_contract_root"))


def gather_inputs(
    samples: Sequence[Any], indices: Sequence[Any], keys: Sequence[str], optional: Set[str], batched: bool
) -> Dict[str, Any]:
    """``{key: value}`` for one item, ``{key: [values]}`` for a batch; an optional key no sample has is left out.

    Raises:
        KeyError: A sample lacks a required key, or only some samples of a batch have an optional one.
    """
    inputs: Dict[str, Any] = {}
    for key in keys:
        absent = [n for n, sample in enumerate(samples) if not (isinstance(sample, Mapping) and key in sample)]
        if absent and key in optional and len(absent) == len(samples):
            continue
        if absent:
            mixed = (
                " Optional inputs cannot be mixed within one batch: some samples provide it and others do not."
                if key in optional
                else ""
            )
            sample = samples[absent[0]]
            has = f"keys: {sorted(map(str, sample))}" if isinstance(sample, Mapping) else f"a {type(sample).__name__}"
            raise ContractKeyError(
                f"Input key {key!r} not found in dataset item.{mixed} (dataset index "
                f"{', '.join(repr(indices[n]) for n in absent)}; dataset[{indices[absent[0]]!r}] has {has})"
            )
        values = [sample[key] for sample in samples]
        inputs[key] = values if batched else values[0]
    return inputs


def out_of_memory_error(indices: Sequence[Any], inputs: Any, exc: BaseException) -> ContractRuntimeError:
    """ESPnet3's advice for a batch that ran out of memory, naming its items and their input lengths."""
    n = len(indices)
    return ContractRuntimeError(
        f"Batched inference ran out of memory on {n} items (dataset indices {list(indices)}, input lengths "
        f"{input_lengths(inputs)}). Lower `batch_size` in the inference config (this batch had {n} items), or "
        f"sort the test set by length so that long utterances are not padded to each other. "
        f"({type(exc).__name__}: {str(exc)[:200]})"
    )


def warn_items_retried(model: Any, indices: Sequence[Any], exc: BaseException) -> None:
    """Log, once per model class, that a failed batch was run item by item."""
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    if name in _WARNED_UNBATCHED:
        return
    _WARNED_UNBATCHED.add(name)
    log.warning(
        "%s (or output_fn) failed on a batch of %d items (%s: %.200s); retry_items_on_batch_error ran them one at "
        "a time. Make the model and output_fn accept lists, or set batch_size to null.",
        name,
        len(indices),
        type(exc).__name__,
        exc,
    )


# ------------------------------------------------------------------ writing
def missing_id_message(idx_key: str, output: Mapping[str, Any]) -> str:
    """ESPnet3's words for a result without its id key, with the keys it has."""
    return (
        "Inference output must include the configured sample identifier key used to map SCP results back to "
        f"dataset samples. idx_key={idx_key!r} (output keys: {sorted(map(str, output))})"
    )


def prepare_record(
    output: Any,
    idx_key: str,
    required: Sequence[str],
    fields: Sequence[str],
    artifacts: Mapping[str, ArtifactSpec],
) -> Tuple[str, List[Tuple[str, PreparedValue]]]:
    """Check one result dict completely: ``(utt_id, [(field, PreparedValue), ...])``, nothing written.

    Args:
        output: One result of ``forward``.
        idx_key: Its id key.
        required: Keys it must have besides the id (``hyp_key`` + ``ref_key``).
        fields: Keys to write; empty for every key but the id.
        artifacts: Resolved ``output_artifacts``.

    Raises:
        TypeError: ``output`` is not a dict, or its id is a list/tuple.
        ValueError: It lacks the id key or a required key (``missing=[...]``), or a value cannot be written.
        KeyError: It lacks one of ``fields``.
    """
    if not isinstance(output, Mapping):
        raise ContractTypeError(f"Expected dict output, got {type(output).__name__}: {output!r:.80}")
    if idx_key not in output:
        raise ContractError(missing_id_message(idx_key, output))
    missing = sorted({*required} - set(output))
    if missing:
        raise ContractError(
            f"Inference output keys must include all required keys. missing={missing} (hyp_key/ref_key; "
            f"output keys: {sorted(map(str, output))})"
        )
    utt_id = check_utt_id(output[idx_key], idx_key)
    absent = [k for k in fields if k not in output]
    if absent:
        raise ContractKeyError(
            f"result {utt_id!r} lacks output keys {absent} (output_keys; its keys: {sorted(map(str, output))})"
        )
    names = list(fields) or [k for k in output if k != idx_key]
    prepared = [
        (check_field_name(name), prepare_value(output[name], name, utt_id, artifacts.get(name))) for name in names
    ]
    return utt_id, prepared


class InferenceRunner(BaseRunner):
    """Inference runner writing one ``<field>.scp`` per output field (its shards resume mid-way).

    Args:
        provider: Provider of ``dataset`` and ``model`` (usually an InferenceProvider).
        idx_key: Output key holding the utterance id (first scp column).
        hyp_key: Hypothesis key(s) each result must have (with ``output_keys`` unset, the fields written).
        ref_key: Reference key(s), likewise. ESPnet3's ``infer()`` passes ``hyp_key=output_keys or []``
            and ``ref_key=[]``: with both empty every key but the id is written.
        output_keys: Fields to write (each result must have them); default ``hyp_key`` + ``ref_key``,
            or every key but the id when those are empty.
        input_key: Dataset item key(s) fed to ``model`` by the default ``forward``.
        output_fn: Import path of ``output_fn(data=, model_output=, idx=)`` that
            turns model output into result dict(s).
        model_kwargs: Extra keyword arguments for the model call.
        output_artifacts: Per field, how non-scalar values are written:
            ``{"type": "npy"}`` (arrays' default), ``{"type": "wav", "sample_rate": 16000}``,
            ``{"type": "json"}`` / ``{"type": "pickle"}``, ``{"writer": "pkg.mod.func", ...}``
            called as ``func(value, path_without_suffix, **other_keys)``, or ESPnet3's
            ``{"writer": {"_target_": "pkg.mod.func", ...}}`` called as
            ``func(value=, output_path=, **options)``; a writer returns the written path.
        retry_items_on_batch_error: When a batch fails (other than running out of memory),
            run its items one at a time instead of raising (ESPnet3 raises); for models
            that take no lists. Off by default.
        **kwargs: BaseRunner arguments (``output_dir``, ``batch_size``, ...).

    The options given are recorded and become env defaults of the static hooks: a
    provider param of the same name (as ESPnet3's ``infer()`` passes them) wins.
    """

    resumable_writers = True

    def __init__(
        self,
        provider: Any,
        idx_key: str = "utt_id",
        hyp_key: Sequence[str] | str = "hyp",
        ref_key: Sequence[str] | str = "ref",
        output_keys: Optional[Sequence[str] | str] = None,
        input_key: Optional[Sequence[str] | str] = None,
        output_fn: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        output_artifacts: Optional[Mapping[str, Mapping[str, Any]]] = None,
        retry_items_on_batch_error: bool = False,
        **kwargs: Any,
    ):
        """Keep the settings and check them (``output_fn`` importable, artifact writers, ``input_key`` given)."""
        super().__init__(provider, **kwargs)
        if not isinstance(idx_key, str) or not idx_key:
            raise ContractError(f"idx_key must be a non-empty string, got {idx_key!r}")
        if not isinstance(retry_items_on_batch_error, bool):
            raise ContractTypeError(
                f"retry_items_on_batch_error must be true or false, got {retry_items_on_batch_error!r}"
            )
        self.idx_key = idx_key
        self.hyp_key = hyp_key if isinstance(hyp_key, str) else list(hyp_key)
        self.ref_key = ref_key if isinstance(ref_key, str) else list(ref_key)
        self.output_keys = [check_field_name(k) for k in as_key_list(output_keys)] or None
        self.input_key = input_key
        self.output_fn = output_fn
        self.model_kwargs = checked_model_kwargs(model_kwargs)
        self.output_artifacts = output_artifacts or None
        self.retry_items_on_batch_error = retry_items_on_batch_error
        if output_fn is not None and not callable(import_object(output_fn, "output_fn")):
            raise ContractError(f"output_fn {output_fn!r} is not callable")
        resolve_artifact_configs(output_artifacts)
        params = getattr(provider, "params", None)  # an InferenceProvider's env is exactly dataset, model, params
        default_forward = inspect.getattr_static(type(self), "forward") is inspect.getattr_static(
            InferenceRunner, "forward"
        )
        if isinstance(params, Mapping) and default_forward and input_key is None and "input_key" not in params:
            raise ContractRuntimeError(
                f"{type(self).__name__} needs input_key (runner_kwargs or provider params): the dataset item "
                "key(s) fed to the model"
            )

    def resolve_idx_key(self, output: Mapping[str, Any]) -> str:
        """The configured id key, checked present in ``output``.

        Args:
            output: One result dict.

        Returns:
            ``idx_key``.

        Raises:
            ValueError: ``output`` lacks it.
        """
        if self.idx_key not in output:
            raise ContractError(missing_id_message(self.idx_key, output))
        return self.idx_key

    @classmethod
    def forward(cls, idx: Any, dataset: Any = None, model: Any = None, **env: Any) -> Any:
        """Call ``model`` with one item or a batch of ``dataset``, as ESPnet3's ``forward``.

        Steps: ``model_kwargs`` must be a mapping (TypeError) and ``input_key`` given
        (RuntimeError). With an ``inference_contract`` (``output_fn`` then refused:
        ValueError), ``input_key`` must match its inputs and the items are prepared by
        it. ``dataset[i][key]`` per input key (a list per key for a batch; a missing key
        is a KeyError; an optional contract input is left out when no item of the batch
        has it) goes through ``cls.prepare_model_inputs`` to
        ``model(**inputs, **model_kwargs)``; the result through ``output_fn(data=,
        model_output=, idx=)`` if one is set (``output_fn`` or ``output_fn_path``), then
        ``cls.format_output(result, batched=)``, then the contract's output checks.

        Subclasses adapt the backend by overriding ``prepare_model_inputs`` and
        ``format_output`` (as ``@staticmethod`` or ``@classmethod``)::

            class ASRRunner(InferenceRunner):
                @staticmethod
                def format_output(result, *, batched):
                    best = lambda hyps: {"text": hyps[0][0] or ""}
                    return [best(r) for r in result] if batched else best(result)

        An overriding ``forward`` that calls ``super().forward`` keeps this checked path.

        A batch whose model call raises is not retried: the model's exception
        propagates (out of memory: a RuntimeError naming the items, their input lengths
        and ``batch_size``), unless ``retry_items_on_batch_error`` is set, which runs
        the items one at a time (an item that fails alone raises its own exception).

        Args:
            idx: One dataset index, or a list of them for a batch.
            dataset: The dataset to read items from.
            model: The backend, called with the inputs as keyword arguments.
            **env: ``input_key``, ``model_kwargs``, ``output_fn`` / ``output_fn_path``,
                ``inference_contract`` (+ ``inference_contract_root``), ``idx_key``,
                ``retry_items_on_batch_error``.

        Returns:
            One result (a dict for the writer), or a list of them for a batch.
        """
        model_kwargs = checked_model_kwargs(env.get("model_kwargs"))
        keys = forward_input_keys(env)
        contract = forward_contract(env)
        batched = isinstance(idx, (list, tuple))
        indices = list(idx) if batched else [idx]
        items, original, optional = dataset, None, set()
        if contract is not None:
            from espnet3_rules.contract.inference import prepare_inference_inputs

            contract.validate_input_keys(env["input_key"])
            items, original = prepare_inference_inputs(dataset, idx, contract, model)
            optional = {spec.name for spec in contract.inputs if spec.optional}
        output_fn = forward_output_fn(env)
        samples = [items[i] for i in indices]
        inputs = cls.prepare_model_inputs(gather_inputs(samples, indices, keys, optional, batched))
        try:
            result = model(**inputs, **model_kwargs)
            if output_fn is not None:
                result = output_fn(data=samples if batched else samples[0], model_output=result, idx=idx)
        except Exception as exc:  # noqa: BLE001 - re-raised unless a batch is retried
            if not batched:
                raise
            if is_out_of_memory(exc):
                raise out_of_memory_error(indices, inputs, exc) from exc
            if not env.get("retry_items_on_batch_error"):
                raise
            return cls._retry_items(indices, dataset, model, env, exc)
        result = cls.format_output(result, batched=batched)
        if contract is not None:
            from espnet3_rules.contract.inference import validate_inference_outputs

            result = validate_inference_outputs(result, idx, contract, model, original, env.get("idx_key", "utt_id"))
        return result

    @classmethod
    def _retry_items(cls, indices: List[Any], dataset: Any, model: Any, env: Dict[str, Any], exc: Exception) -> list:
        """``forward`` of each item of a failed batch; an item that fails alone raises, noting the batch failure."""
        results = []
        for index in indices:
            try:
                results.append(cls.forward(index, dataset=dataset, model=model, **env))
            except Exception as item_exc:
                item_exc.add_note(
                    f"(the batch {indices} had failed first with {type(exc).__name__}: {str(exc)[:200]}; "
                    f"retry_items_on_batch_error ran its items one at a time)"
                )
                raise
        warn_items_retried(model, indices, exc)
        return results

    @staticmethod
    def prepare_model_inputs(inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Adapt the checked inputs to the backend's arguments (override in a system).

        Args:
            inputs: The backend's keyword arguments (a list per key for a batch).

        Returns:
            The keyword arguments the backend is called with; ``inputs`` here.
        """
        return inputs

    @staticmethod
    def format_output(result: Any, *, batched: bool) -> Any:
        """Turn the raw backend result into named outputs (override in a system).

        Args:
            result: What the backend (and ``output_fn``) returned.
            batched: Whether the call was a batch.

        Returns:
            The named output(s); ``result`` here.
        """
        return result

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
        output_keys: Optional[Sequence[str] | str] = None,
        hyp_key: Optional[Sequence[str] | str] = None,
        ref_key: Optional[Sequence[str] | str] = None,
        **env: Any,
    ) -> None:
        """Check each result dict fully (see :func:`prepare_record`), write its artifacts, then its scp lines.

        The fields written are ``output_keys``; when it is None, ``hyp_key`` + ``ref_key``;
        when that is empty too, every key but the id (as ESPnet3).
        """
        shard_dir = writers["shard_dir"]
        required = [*as_key_list(hyp_key), *as_key_list(ref_key)]
        fields = required if output_keys is None else as_key_list(output_keys)
        for output in iter_outputs(result):
            utt_id, prepared = prepare_record(output, idx_key, required, fields, writers["artifacts"])
            lines = [(name, write_prepared(value, shard_dir / name, utt_id)) for name, value in prepared]
            for name, text in lines:
                handle = writers["scp_handles"].get(name)
                if handle is None:
                    handle = (shard_dir / f"{name}.scp").open("w", encoding="utf-8")
                    writers["scp_handles"][name] = handle
                    writers["field_keys"].append(name)
                handle.write(f"{utt_id} {text}\n")

    @classmethod
    def journal_files(cls, writers: Dict[str, Any]) -> List[Any]:
        """The ``<field>.scp`` files opened so far (artifacts are whole files, rewritten when an item reruns)."""
        return list(writers["scp_handles"].values())

    @staticmethod
    def reopen_writers(writers: Dict[str, Any], names: List[str]) -> None:
        """Reopen the journaled ``<field>.scp`` files for appending, as the fields seen so far."""
        for name in names:
            field = name[: -len(".scp")]
            writers["scp_handles"][field] = (writers["shard_dir"] / name).open("a", encoding="utf-8")
            writers["field_keys"].append(field)

    @staticmethod
    def close_writers(writers: Dict[str, Any], state: Optional[Dict[str, Any]] = None, **env: Any) -> None:
        """Close the scp files and write ``field_keys.txt`` (the fields written, sorted, as ESPnet3)."""
        for handle in writers["scp_handles"].values():
            handle.close()
        with atomic_path(writers["shard_dir"] / FIELD_KEYS_NAME) as tmp:
            tmp.write_text("".join(f"{k}\n" for k in sorted(writers["field_keys"])), encoding="utf-8")

    def merge(self, shard_dirs: List[Path]) -> None:
        """Concatenate each field's scp across shards into ``output_dir/shard_subdir``.

        Fields are the union of every shard's (sorted) ``field_keys.txt`` in first-seen
        order; a field's fragment is taken only from shards that list it. Every
        field's ids are checked unique across shards before any merged file is in
        place: the concatenation runs meanwhile in a thread, into temp files that
        are renamed onto ``<field>.scp`` only once every check has passed (and
        removed if one fails). The merged files are not fsynced (see
        :func:`~espnet3_rules.parallel.base_runner.concatenate_shard_files`).

        Args:
            shard_dirs: The completed shard directories, in shard-id order.

        Raises:
            RuntimeError: No shard wrote any field.
            ValueError: A shard lacks ``field_keys.txt`` or a listed fragment, a fragment's
                last line is torn, or an id appears twice.
        """
        shard_fields = [read_field_keys(Path(d)) for d in shard_dirs]
        fields: List[str] = []
        for keys in shard_fields:
            fields.extend(k for k in keys if k not in fields)
        if not fields:
            raise ContractRuntimeError(
                f"No output keys found in inference results: no shard of {self._root()} wrote a field "
                "(forward returned nothing to write)"
            )
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

    def __call__(self, indices: Iterable[Any]) -> bool:
        """Run inference over ``indices`` (plan, pending shards, merge), as ESPnet3.

        Args:
            indices: The dataset indices.

        Returns:
            True once every ``<field>.scp`` is merged under ``output_dir/shard_subdir``.
        """
        super().__call__(indices)
        return True

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
