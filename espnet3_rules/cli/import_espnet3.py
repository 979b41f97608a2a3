"""``python -m espnet3_rules import-espnet3 INFERENCE_YAML [METRICS_YAML]``: an ESPnet3 recipe's
inference (and metrics) config as a workflow config (``config/config.yaml``).

The inference config becomes one job through
:func:`~espnet3_rules.systems.base.inference_jobs.inference_jobs`, the mapping ``infer``
runs by: its test sets (``dataset.test``) become ``test_sets``, its ``parallel:`` section
``n_shards`` and ``resources``; the metrics config's ``metrics:`` and ``dataset_artifacts``
become the job's ``measure:`` section. A YAML file is read as ESPnet3 reads one
(``OmegaConf.load``, ``${self_name:}`` as the file's stem, interpolations resolved); a Hydra
``defaults:`` list other than ``[_self_]`` is refused (compose the config first). A key
that would be dropped or guessed is named in a one-line error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.engine.job import JobSpec
from espnet3_rules.systems.base.inference_jobs import as_plain, inference_jobs, switch_targets, test_set_names

#: Metrics-config keys that only locate the experiment (interpolated into others): they change no result.
PATH_KEYS = ("recipe_dir", "exp_tag", "exp_dir", "data_dir")
#: Keys of a metrics config.
METRICS_KEYS = ("metrics", "dataset_artifacts", "inference_dir", "dataset", *PATH_KEYS)
#: Keys of one ``metrics:`` entry.
METRIC_ENTRY_KEYS = ("metric", "inputs")
#: The job fields every test set shares: what a converted job holds besides its test sets.
SHARED_FIELDS = ("runner", "provider", "params", "runner_kwargs", "n_shards", "batch_size", "resources")


def load_espnet3_yaml(path: Any) -> Dict[str, Any]:
    """Read an ESPnet3 YAML config: plain data, ``${self_name:}`` bound to the file's stem and every
    interpolation resolved (as ESPnet3's ``load_config_with_defaults``); ``defaults: [_self_]`` dropped."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ContractError(f"{path}: cannot read ({exc})") from None
    text = re.sub(r"\$\{self_name:\s*\}", path.stem, text)
    try:
        config = OmegaConf.create(text)
    except OmegaConfBaseException as exc:
        raise ContractError(f"{path}: not an ESPnet3 config ({str(exc).splitlines()[0]})") from None
    if "defaults" in config:
        defaults = OmegaConf.to_container(config.defaults)
        if defaults not in (["_self_"], []):
            raise ContractError(
                f"{path}: defaults {defaults} is a Hydra defaults list, which import-espnet3 does not compose; "
                "pass the composed config (ESPnet3's load_config_with_defaults) instead"
            )
        del config["defaults"]
    try:
        return as_plain(config)
    except ContractError as exc:
        raise ContractError(f"{path}: {exc}") from None


def metric_entry(entry: Any, where: str) -> Dict[str, Any]:
    """One ``metrics:`` entry (``{metric: {_target_: ..., **kwargs}, inputs: ...}``) in the workflow's form."""
    if not isinstance(entry, Mapping):
        raise ContractError(f"{where} must be a mapping with `metric`, got {entry!r:.60}")
    unknown = sorted(set(entry) - set(METRIC_ENTRY_KEYS))
    if unknown:
        raise ContractError(f"{where} has unknown key(s) {unknown}; known: {', '.join(METRIC_ENTRY_KEYS)}")
    metric = entry.get("metric")
    if not isinstance(metric, Mapping) or not isinstance(metric.get("_target_"), str):
        raise ContractError(f"{where}.metric must be a mapping with a `_target_` class path, got {metric!r:.60}")
    converted: Dict[str, Any] = {"metric": metric["_target_"]}
    kwargs = {key: value for key, value in metric.items() if key != "_target_"}
    if kwargs:
        converted["kwargs"] = kwargs
    inputs = entry.get("inputs")
    if isinstance(inputs, list):  # ESPnet3: a list binds each name to itself
        inputs = {name: name for name in inputs}
    if inputs:
        converted["inputs"] = {str(alias): str(source) for alias, source in inputs.items()}
    return converted


def measure_section(metrics: Mapping[str, Any], inference: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """The job's ``measure:`` section from a metrics config (checked against the inference config)."""
    unknown = sorted(set(metrics) - set(METRICS_KEYS))
    if unknown:
        raise ContractError(f"{source}: unknown key(s) {unknown}; known: {', '.join(METRICS_KEYS)}")
    entries = metrics.get("metrics")
    if not isinstance(entries, list) or not entries:
        raise ContractError(f"{source}: metrics must be a non-empty list (Please specify `metrics`!)")
    if metrics.get("inference_dir") not in (None, inference["inference_dir"]):
        raise ContractError(
            f"{source}: inference_dir {metrics['inference_dir']!r} is not the inference config's "
            f"{inference['inference_dir']!r}; the job scores what it infers"
        )
    if (metrics.get("dataset") or {}).get("test") and test_set_names(metrics) != test_set_names(inference):
        raise ContractError(
            f"{source}: dataset.test names {test_set_names(metrics)} are not the inference config's "
            f"{test_set_names(inference)}"
        )
    section: Dict[str, Any] = {
        "metrics": [metric_entry(entry, f"{source}: metrics[{i}]") for i, entry in enumerate(switch_targets(entries))]
    }
    if inference.get("idx_key", "utt_id") != "utt_id":
        section["idx_key"] = inference["idx_key"]
    if metrics.get("dataset_artifacts"):
        section["dataset_artifacts"] = metrics["dataset_artifacts"]
    return section


def job_entry(jobs: List[JobSpec], inference_dir: str) -> Dict[str, Any]:
    """The workflow job whose ``test_sets`` give back ``jobs`` (one per test set, as ``inference_jobs``)."""
    first = jobs[0]
    shared_config = {key: value for key, value in first.provider_config.items() if key != "test_set"}
    entry: Dict[str, Any] = {field: getattr(first, field) for field in SHARED_FIELDS}
    entry.update(output_dir=inference_dir, provider_config=shared_config)
    entry = {key: value for key, value in entry.items() if value not in (None, {})}
    entry["test_sets"] = [{"name": job.test_set, "provider_config": {"test_set": job.test_set}} for job in jobs]
    return entry


def convert(inference_path: Any, metrics_path: Optional[Any] = None) -> Dict[str, Any]:
    """The workflow config (``{"jobs": {<stem>: job}}``) of an inference config and optional metrics config."""
    from espnet3_rules.cli.config import check_config

    inference = load_espnet3_yaml(inference_path)
    name = re.sub(r"\W", "_", Path(inference_path).stem)
    try:
        jobs = inference_jobs(inference, name)
    except ContractError as exc:
        raise ContractError(f"{inference_path}: {exc}") from None
    entry = job_entry(jobs, str(inference["inference_dir"]))
    if metrics_path is not None:
        entry["measure"] = measure_section(load_espnet3_yaml(metrics_path), inference, str(metrics_path))
    config = {"jobs": {name: entry}}
    check_config(config, f"converted {inference_path}")
    return config


def render(config: Mapping[str, Any], sources: List[str]) -> str:
    """The config as YAML, after a header naming its sources and what is left to the user."""
    import yaml

    header = [
        f"# Converted by `python -m espnet3_rules import-espnet3 {' '.join(sources)}`.",
        "# provider_config is the inference config as ESPnet3's infer() hands it to the provider",
        "# (interpolations resolved; `parallel:` became n_shards and resources; espnet3.* _target_",
        "# paths switched to espnet3_rules.*). Left to you: `inputs:` per test set (the files its",
        "# dataset is read from), so that a newer file reruns it; see config/README.md.",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)
