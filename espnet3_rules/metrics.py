"""Scoring merged inference outputs: the ESPnet3 metric interface, WER/CER, ``measure``.

Mirrors ``espnet3.systems.base.metric.measure`` and
``espnet3.components.metrics.base_metric.BaseMetric``: a metric is called as
``metric(data, test_name, output_dir)`` where ``data`` maps each input alias
(``ref``, ``hyp``) to an scp file; ``measure`` binds aliases to files per test
set through a metric config's ``inputs`` (``hyp: hyp`` reads
``<inference_dir>/<test>/hyp.scp``; ``ref: dataset:text`` reads the test set's
own ``text`` column, exported once to ``<test>/dataset/text.scp``) and writes
``{metric: {test_set: result}}`` to ``metrics.json`` atomically.

``jiwer`` is imported inside the WER/CER functions only, so the package imports
without it.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from espnet3_rules.systems.base.artifacts import (
    atomic_path,
    check_utt_id,
    prepare_value,
    resolve_artifact_configs,
    unsafe_name_reason,
    write_prepared,
)
from espnet3_rules.engine.contracts import ContractError, class_path, import_object
from espnet3_rules.engine.files import write_json_atomic
from espnet3_rules.engine.job import build_dataset
from espnet3_rules.engine.plan import jsonable

log = logging.getLogger(__name__)

DATASET_PREFIX = "dataset:"
METRICS_NAME = "metrics.json"


# --------------------------------------------------------------------- scp
def iter_scp(path: Path) -> Iterator[Tuple[str, str]]:
    """``(utt_id, value)`` per non-blank line of an scp/text file (value stripped, may be empty)."""
    path = Path(path)
    number = 0
    try:
        with path.open(encoding="utf-8") as f:
            for number, raw in enumerate(f, 1):
                line = raw.strip()
                if line:
                    parts = line.split(maxsplit=1)
                    yield parts[0], parts[1] if len(parts) > 1 else ""
    except FileNotFoundError:
        raise ContractError(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ContractError(
            f"{path}: text after line {number} is not UTF-8 ({exc.reason}); scp files must be UTF-8"
        ) from None


def read_scp(path: Path) -> Dict[str, str]:
    """An scp/text file as ``{utt_id: value}`` in file order; a repeated id is an error."""
    entries: Dict[str, str] = {}
    for utt_id, value in iter_scp(path):
        if utt_id in entries:
            raise ContractError(f"{path}: id {utt_id!r} appears twice")
        entries[utt_id] = value
    return entries


# ------------------------------------------------------------ metric base
class BaseMetric(ABC):
    """A metric over one test set's input files (ESPnet3's ``BaseMetric`` shape).

    ``input_names`` are the aliases a metric reads; ``measure`` refuses a
    metric config whose ``inputs`` does not bind every one of them.
    """

    input_names: Tuple[str, ...] = ()

    @abstractmethod
    def __call__(self, data: Dict[str, Path], test_name: str, output_dir: Path) -> Dict[str, Any]:
        """Score one test set.

        Args:
            data: Input alias -> file (usually an scp of ``<id> <value>`` lines).
            test_name: The test set (its files live in ``output_dir/test_name``).
            output_dir: The inference directory; a metric may write details
                under ``output_dir/test_name``.

        Returns:
            A JSON-serializable dict, e.g. ``{"WER": 12.5}``.
        """
        raise NotImplementedError

    def iter_inputs(self, data: Mapping[str, Path], *keys: str) -> Iterator[Tuple[str, Dict[str, str]]]:
        """``(utt_id, {key: value})`` from several scp files read in lockstep (same ids, same order)."""
        if not keys:
            raise ContractError(f"{type(self).__name__}.iter_inputs needs at least one input key")
        iterators = [iter_scp(data[key]) for key in keys]
        for rows in _zip_strict(iterators, keys, data):
            utt_id = rows[0][0]
            for key, (other_id, _) in zip(keys[1:], rows[1:]):
                if other_id != utt_id:
                    raise ContractError(f"{data[key]}: id {other_id!r} where {data[keys[0]]} has {utt_id!r}")
            yield utt_id, {key: value for key, (_, value) in zip(keys, rows)}


def _zip_strict(iterators: List[Iterator[Any]], keys: Sequence[str], data: Mapping[str, Path]) -> Iterator[tuple]:
    sentinel = object()
    while True:
        rows = [next(it, sentinel) for it in iterators]
        ended = [key for key, row in zip(keys, rows) if row is sentinel]
        if len(ended) == len(keys):
            return
        if ended:
            raise ContractError(f"scp length mismatch: {[str(data[k]) for k in ended]} ended before the others")
        yield tuple(rows)


# ------------------------------------------------------------- error rates
@dataclass(frozen=True)
class ErrorCounts:
    """Corpus-level edit counts; ``rate`` = (S + D + I) / reference length, as sclite reports."""

    substitutions: int
    deletions: int
    insertions: int
    hits: int

    @property
    def ref_length(self) -> int:
        """Reference words (or characters): hits + substitutions + deletions."""
        return self.hits + self.substitutions + self.deletions

    @classmethod
    def from_jiwer(cls, out: Any) -> "ErrorCounts":
        """Counts of a ``jiwer.process_words`` / ``process_characters`` result."""
        return cls(out.substitutions, out.deletions, out.insertions, out.hits)

    @property
    def rate(self) -> float:
        """Error rate as a fraction."""
        if self.ref_length == 0:
            raise ContractError("the references are empty: the error rate is undefined")
        return (self.substitutions + self.deletions + self.insertions) / self.ref_length


def _jiwer_output(refs: Sequence[str], hyps: Sequence[str], unit: str) -> Any:
    """jiwer's alignment of the pairs, by word or by character."""
    import jiwer

    if not refs:
        raise ContractError("no reference utterances to score")
    if unit == "word":
        return jiwer.process_words(list(refs), list(hyps))
    return jiwer.process_characters(list(refs), list(hyps))


def error_counts(refs: Sequence[str], hyps: Sequence[str], unit: str = "word") -> ErrorCounts:
    """Total S/D/I/hits over aligned reference/hypothesis pairs (``unit``: ``word`` or ``char``).

    Words are whitespace-separated tokens; characters include inner spaces
    (ESPnet's ``<space>`` token). An empty hypothesis is all deletions.
    """
    return ErrorCounts.from_jiwer(_jiwer_output(refs, hyps, unit))


def paired_texts(ref_path: Path, hyp_path: Path) -> Tuple[List[str], List[str], List[str], List[str]]:
    """Pair hypotheses with references by id: ``(ids, refs, hyps, missing_ids)``.

    A reference id without a hypothesis gets an empty hypothesis (all
    deletions) and is listed in ``missing_ids``; a hypothesis id that is not
    in the references is an error.
    """
    refs = read_scp(ref_path)
    hyps = read_scp(hyp_path)
    extra = [utt_id for utt_id in hyps if utt_id not in refs]
    if extra:
        raise ContractError(
            f"{hyp_path}: {len(extra)} id(s) not in the references {ref_path}: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}"
        )
    ids = list(refs)
    missing = [utt_id for utt_id in ids if utt_id not in hyps]
    return ids, [refs[i] for i in ids], [hyps.get(i, "") for i in ids], missing


class ErrorRate(BaseMetric):
    """Corpus-level error rate of ``hyp`` against ``ref``, matched by utterance id.

    Returns ``{NAME: percent (2 decimals, as ESPnet3), "ref_<unit>s", "substitutions",
    "deletions", "insertions", "utterances", "missing_hyp"}`` and writes
    ``<output_dir>/<test>/<name>_alignment`` (jiwer's alignment view).
    """

    name = ""
    unit = ""

    def __init__(self, ref_key: str = "ref", hyp_key: str = "hyp"):
        """Aliases of the reference and hypothesis inputs."""
        self.ref_key = ref_key
        self.hyp_key = hyp_key

    @property
    def input_names(self) -> Tuple[str, ...]:  # type: ignore[override]
        """The two aliases this metric reads."""
        return (self.ref_key, self.hyp_key)

    def __call__(self, data: Dict[str, Path], test_name: str, output_dir: Path) -> Dict[str, Any]:
        """Score one test set; missing hypotheses count as deletions and are reported."""
        import jiwer

        ids, refs, hyps, missing = paired_texts(data[self.ref_key], data[self.hyp_key])
        if missing:
            log.warning(
                "%s %s: %d of %d reference utterances have no hypothesis (scored as deletions): %s",
                self.name,
                test_name,
                len(missing),
                len(ids),
                missing[:5],
            )
        out = _jiwer_output(refs, hyps, self.unit)
        counts = ErrorCounts.from_jiwer(out)
        with atomic_path(Path(output_dir) / test_name / f"{self.name.lower()}_alignment") as tmp:
            tmp.write_text(jiwer.visualize_alignment(out), encoding="utf-8")
        return {
            self.name: round(counts.rate * 100, 2),
            f"ref_{self.unit}s": counts.ref_length,
            "substitutions": counts.substitutions,
            "deletions": counts.deletions,
            "insertions": counts.insertions,
            "utterances": len(ids),
            "missing_hyp": len(missing),
        }


class WER(ErrorRate):
    """Word error rate (percent)."""

    name = "WER"
    unit = "word"


class CER(ErrorRate):
    """Character error rate (percent); spaces between words count as characters."""

    name = "CER"
    unit = "char"


# -------------------------------------------------------- dataset columns
@dataclass
class DatasetSource:
    """How to read a test set for ``dataset:<column>`` inputs.

    Args:
        build: Zero-argument function returning the test set (``len`` and
            ``dataset[i]`` -> dict).
        identity: JSON-able description of what ``build`` reads (provider,
            its config and params). An exported column is reused only while
            the identity it was written with is unchanged; ``None`` never reuses.
    """

    build: Callable[[], Any]
    identity: Any = None


def export_dataset_column(
    dataset: Any, column: str, out_path: Path, idx_key: str = "utt_id", artifact_config: Optional[Mapping] = None
) -> Path:
    """Write ``dataset[i][column]`` for every item as ``<id> <value>`` lines to ``out_path`` (atomically).

    The id is ``item[idx_key]`` (the index when absent, as ESPnet3 does);
    non-scalar values become artifacts under ``out_path.parent/<column>/``
    exactly as :class:`InferenceRunner` writes outputs (``artifact_config`` is
    an ``output_artifacts`` entry, e.g. ``{"type": "wav", "sample_rate": 16000}``).
    """
    out_path = Path(out_path)
    spec = resolve_artifact_configs({column: artifact_config} if artifact_config else None).get(column)
    seen = set()
    with atomic_path(out_path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for index in range(len(dataset)):
            item = dataset[index]
            if not isinstance(item, Mapping) or column not in item:
                keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
                raise ContractError(f"dataset[{index}] has no column {column!r} (it has {keys})")
            utt_id = check_utt_id(item.get(idx_key, str(index)), idx_key)
            if utt_id in seen:
                raise ContractError(f"dataset[{index}]: id {utt_id!r} appears twice in the test set")
            seen.add(utt_id)
            prepared = prepare_value(item[column], column, utt_id, spec)
            handle.write(f"{utt_id} {write_prepared(prepared, out_path.parent / column, utt_id)}\n")
    return out_path


def dataset_column_scp(
    test_dir: Path,
    column: str,
    source: DatasetSource,
    idx_key: str = "utt_id",
    artifact_config: Optional[Mapping] = None,
    cache: Optional[Dict[str, Any]] = None,
) -> Path:
    """``<test_dir>/dataset/<column>.scp``, exported unless an export of the same source exists.

    ``<column>.source.json`` beside it records what it was exported from;
    ``cache`` (one dict per test set) lets several columns and metrics share
    one ``build()`` and one export.
    """
    cache = cache if cache is not None else {}
    path = Path(test_dir) / "dataset" / f"{column}.scp"
    if cache.get(f"column:{column}") == path:
        return path
    stamp_path = path.with_name(f"{column}.source.json")
    stamp = jsonable({"identity": source.identity, "idx_key": idx_key, "artifact": artifact_config})
    if source.identity is not None and path.exists() and _read_json(stamp_path) == stamp:
        return path
    if "dataset" not in cache:
        cache["dataset"] = source.build()
    stamp_path.unlink(missing_ok=True)
    export_dataset_column(cache["dataset"], column, path, idx_key, artifact_config)
    write_json_atomic(stamp_path, stamp)
    cache[f"column:{column}"] = path
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def provider_dataset_source(provider: Any) -> DatasetSource:
    """A provider's test set (see :func:`espnet3_rules.engine.job.build_dataset`), built when a column is needed."""
    identity = {
        "provider": class_path(type(provider)),
        "config": jsonable(getattr(provider, "config", None)),
        "params": jsonable(getattr(provider, "params", None) or {}),
    }
    return DatasetSource(build=lambda: build_dataset(provider), identity=identity)


# ---------------------------------------------------------------- measure
@dataclass
class MetricEntry:
    """One configured metric: its result key, instance and ``alias -> source`` inputs."""

    key: str
    metric: BaseMetric
    inputs: Dict[str, str]


def build_metrics(configs: Sequence[Mapping[str, Any]]) -> List[MetricEntry]:
    """Instantiate ``[{"metric": "pkg.Class", "kwargs": {...}, "inputs": {...}, "name": ...}]`` and check them."""
    if not configs:
        raise ContractError("measure needs at least one metric")
    entries: List[MetricEntry] = []
    for position, config in enumerate(configs):
        where = f"metrics[{position}]"
        if not isinstance(config, Mapping) or "metric" not in config:
            raise ContractError(f"{where} must be a mapping with 'metric: pkg.module.Class'")
        unknown = set(config) - {"metric", "kwargs", "inputs", "name"}
        if unknown:
            raise ContractError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: metric, kwargs, inputs, name")
        cls = import_object(config["metric"], f"{where}.metric")
        try:
            metric = cls(**dict(config.get("kwargs") or {}))
        except TypeError as exc:
            raise ContractError(f"{where}: cannot construct {config['metric']}: {exc}") from None
        if not isinstance(metric, BaseMetric):
            raise ContractError(f"{where}: {config['metric']} is not an espnet3_rules.metrics.BaseMetric")
        inputs = config.get("inputs") or {}
        inputs = {k: k for k in inputs} if isinstance(inputs, (list, tuple)) else dict(inputs)
        unbound = [name for name in metric.input_names if name not in inputs]
        if unbound:
            raise ContractError(
                f"{where}: {config['metric']} reads {list(metric.input_names)}; bind {unbound} in its inputs "
                "(e.g. hyp: <output field>, ref: dataset:<column>)"
            )
        for alias, source in inputs.items():
            name = str(source)[len(DATASET_PREFIX) :] if str(source).startswith(DATASET_PREFIX) else str(source)
            reason = unsafe_name_reason(name)
            if reason:
                raise ContractError(f"{where}.inputs.{alias}: {source!r} cannot name a file ({reason})")
        key = config.get("name") or class_path(cls)
        if any(e.key == key for e in entries):
            raise ContractError(f"{where}: a second metric keyed {key!r}; give each a distinct 'name'")
        entries.append(MetricEntry(key=key, metric=metric, inputs={k: str(v) for k, v in inputs.items()}))
    return entries


def discover_test_sets(inference_dir: Path) -> List[str]:
    """Non-hidden subdirectories of ``inference_dir``, sorted (ESPnet3's default)."""
    if not Path(inference_dir).is_dir():
        raise ContractError(f"inference_dir {inference_dir} does not exist; run the inference jobs first")
    names = sorted(p.name for p in Path(inference_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ContractError(f"no test sets given and no test-set directories under {inference_dir}")
    return names


def measure(
    metrics: Sequence[Mapping[str, Any]],
    inference_dir: Any,
    test_sets: Optional[Sequence[str]] = None,
    datasets: Optional[Mapping[str, DatasetSource]] = None,
    idx_key: str = "utt_id",
    dataset_artifacts: Optional[Mapping[str, Mapping[str, Any]]] = None,
    output_path: Any = None,
) -> Dict[str, Dict[str, Any]]:
    """Score every test set with every metric; write ``{metric: {test_set: result}}`` atomically.

    Args:
        metrics: Metric configs: ``metric`` (import path of a BaseMetric
            class), optional ``kwargs``, ``inputs`` (alias -> an output field,
            read from ``<inference_dir>/<test>/<field>.scp``, or
            ``dataset:<column>``), optional ``name`` (result key; default the
            class path).
        inference_dir: Holds one ``<test>/`` directory of merged outputs per test set.
        test_sets: Test-set names; default every non-hidden subdirectory.
        datasets: Per test set, where ``dataset:<column>`` inputs are read from.
        idx_key: Item key of the utterance id in the dataset.
        dataset_artifacts: Per column, how non-scalar column values are written
            (an ``output_artifacts`` entry).
        output_path: Default ``<inference_dir>/metrics.json``.

    Returns:
        The results written.
    """
    inference_dir = Path(inference_dir)
    entries = build_metrics(metrics)
    names = list(test_sets) if test_sets is not None else discover_test_sets(inference_dir)
    if not names:
        raise ContractError("measure needs at least one test set")
    for name in names:
        reason = unsafe_name_reason(str(name))
        if reason:
            raise ContractError(f"test set {name!r} cannot name a directory ({reason})")
        if not (inference_dir / name).is_dir():
            raise ContractError(f"test set {name!r}: {inference_dir / name} does not exist; run its inference first")
    results: Dict[str, Dict[str, Any]] = {entry.key: {} for entry in entries}
    for test_name in names:
        cache: Dict[str, Any] = {}
        for entry in entries:
            test_dir = inference_dir / test_name
            data = {
                alias: _input_path(source, test_dir, test_name, datasets, idx_key, dataset_artifacts, cache)
                for alias, source in entry.inputs.items()
            }
            result = entry.metric(data, test_name, inference_dir)
            _check_result(entry.key, test_name, result)
            results[entry.key][test_name] = result
    write_json_atomic(Path(output_path) if output_path is not None else inference_dir / METRICS_NAME, results)
    return results


def _input_path(
    source: str,
    test_dir: Path,
    test_name: str,
    datasets: Optional[Mapping[str, DatasetSource]],
    idx_key: str,
    dataset_artifacts: Optional[Mapping[str, Mapping[str, Any]]],
    cache: Dict[str, Any],
) -> Path:
    """The file behind one input source: ``<test_dir>/<field>.scp`` or an exported dataset column."""
    if source.startswith(DATASET_PREFIX):
        column = source[len(DATASET_PREFIX) :]
        if not datasets or test_name not in datasets:
            raise ContractError(f"input {source!r} of test set {test_name!r} needs its dataset; none was given")
        artifact = (dataset_artifacts or {}).get(column)
        return dataset_column_scp(test_dir, column, datasets[test_name], idx_key, artifact, cache)
    path = test_dir / f"{source}.scp"
    if not path.is_file():
        fields = sorted(p.stem for p in test_dir.glob("*.scp"))
        raise ContractError(f"{path} does not exist; {test_name} has output fields {fields}")
    return path


def _check_result(key: str, test_name: str, result: Any) -> None:
    if not isinstance(result, Mapping):
        raise ContractError(f"metric {key} returned a {type(result).__name__} for {test_name}; return a dict")
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"metric {key} result for {test_name} is not plain JSON ({exc})") from None
