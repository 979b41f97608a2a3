"""Scoring merged inference outputs into ``metrics.json`` (ESPnet3's ``espnet3.systems.base.metric``).

One engine for both callers: :func:`measure` takes ESPnet3's metrics config (and the
inference config, for ``dataset:<column>`` inputs); the workflow's measure rule
(:mod:`espnet3_rules.cli.measure`) calls :func:`score` with each test set's job
provider. A metric config is ESPnet3's ``{metric: {_target_: pkg.Class, **kwargs},
inputs: {...}}`` or this project's ``{metric: pkg.Class, kwargs: {...}, inputs: {...},
name: ...}``; an input is an SCP stem (``hyp`` reads ``<inference_dir>/<test>/hyp.scp``)
or ``dataset:<column>``, the test set's own column exported once to
``<test>/dataset/<column>.scp`` and reused while what it was read from is unchanged.
The results, ``{metric class path (or name): {test set: result}}``, are written
atomically as ESPnet3 writes them (``indent=2``, ``ensure_ascii=False``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from espnet3_rules.components.metrics.base_metric import BaseMetric
from espnet3_rules.contract.metrics import (
    DATASET_PREFIX,
    check_metric_contract,
    check_metric_inputs,
    check_metric_output,
)
from espnet3_rules.engine.contracts import (
    ContractAssertionError,
    ContractAttributeError,
    ContractError,
    ContractFileNotFoundError,
    ContractKeyError,
    ContractTypeError,
    class_path,
    import_object,
)
from espnet3_rules.engine.files import atomic_path, write_json_atomic
from espnet3_rules.engine.job import build_dataset
from espnet3_rules.engine.plan import jsonable
from espnet3_rules.systems.base.artifacts import (
    check_utt_id,
    prepare_value,
    resolve_artifact_configs,
    unsafe_name_reason,
    write_prepared,
)
from espnet3_rules.utils.scp_utils import get_class_path, load_scp_paths

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
#: Keys of one metric config (both forms).
METRIC_KEYS = ("metric", "kwargs", "inputs", "name")


# -------------------------------------------------------- dataset columns
@dataclass
class DatasetSource:
    """How to read a test set for ``dataset:<column>`` inputs.

    Args:
        build: Zero-argument function returning the test set (``len`` and
            ``dataset[i]`` -> dict).
        identity: JSON-able description of what ``build`` reads. An exported
            column is reused only while the identity it was written with is
            unchanged; ``None`` never reuses.
    """

    build: Callable[[], Any]
    identity: Any = None


def export_dataset_column(
    dataset: Any,
    column: str,
    out_path: Path,
    idx_key: str = "utt_id",
    artifact_config: Optional[Mapping] = None,
    test_name: str = "",
) -> Path:
    """Write ``dataset[i][column]`` for every item as ``<id> <value>`` lines to ``out_path`` (atomically).

    The id is ``item[idx_key]`` (the index when absent, as ESPnet3 does);
    non-scalar values become artifacts under ``out_path.parent/<column>/``
    exactly as :class:`InferenceRunner` writes outputs (``artifact_config`` is
    an ``output_artifacts`` entry, e.g. ``{"type": "wav", "sample_rate": 16000}``).

    Raises:
        KeyError: An item has no ``column``.
    """
    out_path = Path(out_path)
    spec = resolve_artifact_configs({column: artifact_config} if artifact_config else None).get(column)
    seen = set()
    with atomic_path(out_path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for index in range(len(dataset)):
            item = dataset[index]
            if not isinstance(item, Mapping) or column not in item:
                keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
                raise ContractKeyError(f"test set {test_name!r} item {index} has no {column!r}; it has {keys}")
            utt_id = check_utt_id(item.get(idx_key, str(index)), idx_key)
            if utt_id in seen:
                raise ContractError(f"test set {test_name!r} item {index}: id {utt_id!r} appears twice")
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
        log.info("Reusing %s", path)
        return path
    if "dataset" not in cache:
        cache["dataset"] = source.build()
    stamp_path.unlink(missing_ok=True)
    export_dataset_column(cache["dataset"], column, path, idx_key, artifact_config, Path(test_dir).name)
    write_json_atomic(stamp_path, stamp)
    cache[f"column:{column}"] = path
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def provider_dataset_source(provider: Any) -> DatasetSource:
    """A job provider's test set (see :func:`espnet3_rules.engine.job.build_dataset`), built when a column is needed."""
    identity = {
        "provider": class_path(type(provider)),
        "config": jsonable(getattr(provider, "config", None)),
        "params": jsonable(getattr(provider, "params", None) or {}),
    }
    return DatasetSource(build=lambda: build_dataset(provider), identity=identity)


def config_dataset_source(inference_config: Any, test_name: str) -> DatasetSource:
    """ESPnet3's way to a test set: the inference config's provider class (``provider._target_``, else
    :class:`InferenceProvider`) ``build_dataset(config)`` with ``config.test_set`` set."""
    from omegaconf import OmegaConf

    config = dict(plain(inference_config))
    config["test_set"] = test_name
    provider = config.get("provider")
    target = provider.get("_target_") if isinstance(provider, Mapping) else None
    if target:
        provider_cls = import_object(target, "inference_config.provider._target_")
    else:
        from espnet3_rules.systems.base.inference_provider import InferenceProvider as provider_cls
    identity = {"provider": class_path(provider_cls), "config": jsonable(config)}
    return DatasetSource(build=lambda: provider_cls.build_dataset(OmegaConf.create(config)), identity=identity)


# ---------------------------------------------------------------- metrics
def plain(config: Any) -> Any:
    """An OmegaConf config as plain dicts/lists (interpolations resolved); anything else unchanged."""
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)
    return config


@dataclass
class MetricEntry:
    """One configured metric: its result key, instance and ``declared name -> source`` inputs."""

    key: str
    metric: BaseMetric
    inputs: Dict[str, str]


def build_metric(config: Mapping[str, Any], where: str) -> MetricEntry:
    """Instantiate and check one metric config (either form; see the module docstring)."""
    if not isinstance(config, Mapping) or "metric" not in config:
        raise ContractError(f"{where} must be a mapping with 'metric: pkg.module.Class' or 'metric: {{_target_: ...}}'")
    unknown = set(config) - set(METRIC_KEYS)
    if unknown:
        raise ContractError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(METRIC_KEYS)}")
    target = config["metric"]
    if isinstance(target, Mapping):
        if config.get("kwargs"):
            raise ContractError(f"{where}: with metric: {{_target_: ...}} the kwargs go inside metric:, not in kwargs")
        metric = _instantiate(dict(target), f"{where}.metric")
    else:
        cls = import_object(target, f"{where}.metric")
        try:
            metric = cls(**dict(config.get("kwargs") or {}))
        except TypeError as exc:
            raise ContractTypeError(f"{where}: cannot construct {target}: {exc}") from None
    if not isinstance(metric, BaseMetric):
        raise ContractTypeError(f"{where}: {type(metric)} is not a valid BaseMetric instance")
    check_metric_contract(metric)
    inputs = check_metric_inputs(metric, config.get("inputs")) or {}
    for alias, source in inputs.items():
        name = source[len(DATASET_PREFIX) :] if source.startswith(DATASET_PREFIX) else source
        reason = unsafe_name_reason(name)
        if reason:
            raise ContractError(f"{where}.inputs.{alias}: {source!r} cannot name a file ({reason})")
    return MetricEntry(key=config.get("name") or get_class_path(metric), metric=metric, inputs=inputs)


def _instantiate(target: Dict[str, Any], where: str) -> Any:
    """``hydra.utils.instantiate`` of a ``{_target_: ...}`` config; a failure as one line naming ``where``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if "_target_" not in target:
        raise ContractError(f"{where} needs _target_: pkg.module.Class")
    import_object(target["_target_"], f"{where}._target_")
    try:
        return instantiate(target)
    except (InstantiationException, TypeError) as exc:
        reason = " ".join(str(exc).split())
        raise ContractTypeError(f"{where}: cannot construct {target['_target_']}: {reason}") from None


def build_metrics(configs: Sequence[Mapping[str, Any]]) -> List[MetricEntry]:
    """Every metric config built and checked; two results under one key are refused."""
    if not configs:
        raise ContractAssertionError("Please specify `metrics`: measure needs at least one metric")
    entries: List[MetricEntry] = []
    for position, config in enumerate(configs):
        entry = build_metric(config, f"metrics[{position}]")
        if any(other.key == entry.key for other in entries):
            raise ContractError(
                f"metrics[{position}]: a second metric keyed {entry.key!r}; give each a distinct 'name'"
            )
        entries.append(entry)
    return entries


# ---------------------------------------------------------------- scoring
def discover_test_sets(inference_dir: Path) -> List[str]:
    """Non-hidden subdirectories of ``inference_dir``, sorted (ESPnet3's default)."""
    if not Path(inference_dir).is_dir():
        raise ContractFileNotFoundError(f"inference_dir {inference_dir} does not exist; run the inference first")
    names = sorted(p.name for p in Path(inference_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ContractError(
            "No test sets found. Specify `metrics_config.dataset.test` or place test-set subdirectories "
            f"under inference_dir: {inference_dir}"
        )
    return names


def score(
    entries: Sequence[MetricEntry],
    inference_dir: Any,
    test_sets: Sequence[str],
    datasets: Optional[Mapping[str, DatasetSource]] = None,
    idx_key: str = "utt_id",
    dataset_artifacts: Optional[Mapping[str, Mapping[str, Any]]] = None,
    output_path: Any = None,
) -> Dict[str, Dict[str, Any]]:
    """Score every test set with every metric and write the results atomically.

    Args:
        entries: The metrics (:func:`build_metrics`).
        inference_dir: Holds one ``<test>/`` directory of merged outputs per test set;
            each metric writes its artifacts (e.g. ``wer_alignment``) there.
        test_sets: Test-set names.
        datasets: Per test set, where ``dataset:<column>`` inputs are read from.
        idx_key: Item key of the utterance id in the dataset.
        dataset_artifacts: Per column, how non-scalar values are written (an
            ``output_artifacts`` entry).
        output_path: Default ``<inference_dir>/metrics.json``.

    Returns:
        ``{metric key: {test set: result}}``, as written.
    """
    inference_dir = Path(inference_dir)
    if not test_sets:
        raise ContractError("measure needs at least one test set")
    for name in test_sets:
        reason = unsafe_name_reason(str(name))
        if reason:
            raise ContractError(f"test set {name!r} cannot name a directory ({reason})")
        if not (inference_dir / name).is_dir():
            raise ContractAssertionError(
                f"Missing hypothesis/reference files in inference_dir: {inference_dir / name} does not exist; "
                f"run the inference of test set {name!r} first"
            )
    caches: Dict[str, Dict[str, Any]] = {name: {} for name in test_sets}
    results: Dict[str, Dict[str, Any]] = {}
    for entry in entries:
        results[entry.key] = {}
        for test_name in test_sets:
            data = _input_paths(entry.inputs, inference_dir, test_name, datasets, idx_key, dataset_artifacts, caches)
            result = entry.metric(data, test_name, inference_dir)
            check_metric_output(entry.metric, result)
            _check_json(entry.key, test_name, result)
            results[entry.key][test_name] = result
    with atomic_path(Path(output_path) if output_path is not None else inference_dir / METRICS_NAME, True) as tmp:
        tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return results


def _input_paths(
    inputs: Mapping[str, str],
    inference_dir: Path,
    test_name: str,
    datasets: Optional[Mapping[str, DatasetSource]],
    idx_key: str,
    dataset_artifacts: Optional[Mapping[str, Mapping[str, Any]]],
    caches: Dict[str, Dict[str, Any]],
) -> Dict[str, Path]:
    """Each input's file: ``<test>/<stem>.scp``, or the test set's exported ``dataset:<column>``."""
    stems = {alias: source for alias, source in inputs.items() if not source.startswith(DATASET_PREFIX)}
    data = load_scp_paths(inference_dir, test_name, stems) if stems else {}
    for alias, source in inputs.items():
        if alias in data:
            continue
        if not datasets or test_name not in datasets:
            raise ContractError(
                f"reading `{source}` for test set {test_name!r} needs the inference config for the test set "
                "definition; pass inference_config"
            )
        column = source[len(DATASET_PREFIX) :]
        artifact = (dataset_artifacts or {}).get(column)
        data[alias] = dataset_column_scp(
            inference_dir / test_name, column, datasets[test_name], idx_key, artifact, caches[test_name]
        )
    return {alias: data[alias] for alias in inputs}


def _check_json(key: str, test_name: str, result: Any) -> None:
    if not isinstance(result, Mapping):
        raise ContractError(f"metric {key} returned a {type(result).__name__} for {test_name}; return a dict")
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"metric {key} result for {test_name} is not plain JSON ({exc})") from None


# ---------------------------------------------------------------- measure
def resolve_test_sets(metrics_config: Mapping[str, Any]) -> List[str]:
    """``dataset.test[].name`` of the metrics config, else the non-hidden subdirectories of ``inference_dir``."""
    tests = (metrics_config.get("dataset") or {}).get("test")
    if tests:
        return [str(test["name"]) for test in tests]
    return discover_test_sets(Path(metrics_config["inference_dir"]))


def measure(metrics_config: Any, inference_config: Any = None) -> Dict[str, Dict[str, Any]]:
    """Compute every metric on every test set and write ``<inference_dir>/metrics.json``.

    Args:
        metrics_config: ESPnet3's metrics config (a mapping or OmegaConf config):
            ``inference_dir``, ``metrics`` (each ``{metric: {_target_: ...}, inputs:
            {name: source}}``), optional ``dataset.test`` (``[{name: ...}]``; default
            every non-hidden directory of ``inference_dir``) and ``dataset_artifacts``.
        inference_config: The inference config, needed for ``dataset:<column>``
            inputs (its ``provider`` class's ``build_dataset``, its ``idx_key``).

    Returns:
        ``{metric class path: {test set: result}}``.

    Raises:
        ValueError: No test set can be resolved, or a metric's inputs do not fit its declaration.
        TypeError: A metric is not a :class:`BaseMetric` or declares no contract.

    Examples:
        >>> results = measure(metrics_config, inference_config)  # doctest: +SKIP
        >>> results["espnet3_rules.systems.esp2_asr.metrics.wer.WER"]["test-clean"]  # doctest: +SKIP
        {'WER': 4.3}
    """
    metrics_config = plain(metrics_config)
    inference_config = plain(inference_config)
    if not isinstance(metrics_config, Mapping) or "inference_dir" not in metrics_config:
        raise ContractAttributeError("metrics_config needs inference_dir (the directory holding <test>/*.scp)")
    test_sets = resolve_test_sets(metrics_config)
    entries = build_metrics(metrics_config.get("metrics") or [])
    datasets = (
        {name: config_dataset_source(inference_config, name) for name in test_sets}
        if inference_config is not None
        else None
    )
    return score(
        entries,
        metrics_config["inference_dir"],
        test_sets,
        datasets=datasets,
        idx_key=(inference_config or {}).get("idx_key", "utt_id"),
        dataset_artifacts=metrics_config.get("dataset_artifacts"),
    )
