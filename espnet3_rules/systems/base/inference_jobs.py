"""The one mapping from an ESPnet3 inference config (``conf/inference.yaml``) to job descriptions.

:func:`inference_jobs` checks the config as ESPnet3 202611's ``infer(config)`` does (same
error types, its words) and gives, per test set of ``dataset.test``, the :class:`JobSpec`
that ``infer`` records when it builds that test set's provider and runner: ``infer``
(:mod:`.inference`) builds from it, and ``python -m espnet3_rules import-espnet3``
(:mod:`espnet3_rules.cli.import_espnet3`) writes it into a workflow config. Nothing is
built here; only ``output_fn`` and the contract's ``imports`` are imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from espnet3_rules.engine.contracts import (
    ContractAssertionError,
    ContractAttributeError,
    ContractError,
    ContractRuntimeError,
    import_object,
)
from espnet3_rules.engine.job import JobSpec
from espnet3_rules.engine.plan import jsonable

#: Keys of the ``parallel:`` section (ESPnet3's ``set_parallel`` config).
PARALLEL_KEYS = ("env", "n_workers", "options", "allow_overwrite_lock")
#: Keys of the ``provider:`` section: infer passes the whole config and the params itself.
PROVIDER_KEYS = ("_target_", "params")
#: Runner constructor arguments infer sets itself; a ``runner:`` section may not set them.
INFER_RUNNER_ARGUMENTS = ("provider", "idx_key", "hyp_key", "ref_key", "batch_size", "output_dir")
#: Hydra instantiate flags: they change how a section is built, which a job cannot record.
HYDRA_FLAGS = ("_recursive_", "_convert_", "_partial_", "_args_")


def as_plain(config: Any) -> Dict[str, Any]:
    """The config as plain data, interpolations resolved as OmegaConf resolves them."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        plain = jsonable(OmegaConf.create(config) if not OmegaConf.is_config(config) else config)
    except OmegaConfBaseException as exc:
        raise ContractError(f"inference config: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(plain, dict):
        raise ContractError(f"inference config must be a mapping, got {type(plain).__name__}")
    return plain


def switch_targets(config: Any) -> Any:
    """``config`` with each ``_target_`` under ``espnet3.`` pointed at ``espnet3_rules.`` (the same
    switch as a user's import lines), at any depth; everything else as is."""
    if isinstance(config, dict):
        return {
            key: "espnet3_rules." + value[len("espnet3."):]
            if key == "_target_" and isinstance(value, str) and value.startswith("espnet3.")
            else switch_targets(value)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [switch_targets(value) for value in config]
    return config


def test_set_names(config: Mapping[str, Any]) -> List[str]:
    """``dataset.test[].name``, checked as infer checks them."""
    dataset = config.get("dataset")
    entries = dataset.get("test") if isinstance(dataset, Mapping) else None
    if not isinstance(entries, list):
        raise ContractAttributeError(
            f"inference_config.dataset.test must be a list of test sets with a `name`, got {entries!r:.60}"
        )
    names = []
    for index, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ContractRuntimeError(
                "inference_config.dataset.test entries must define non-empty `name` "
                f"(failed at index {index})."
            )
        names.append(name)
    if not names:
        raise ContractAssertionError("No test set found in dataset (inference_config.dataset.test is empty)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ContractAssertionError(f"Duplicate test key found. (inference_config.dataset.test names {duplicates})")
    return names


def required_section(config: Mapping[str, Any], key: str, known: Optional[tuple] = None) -> Dict[str, Any]:
    """``config[key]``: a mapping with a ``_target_``; with ``known``, no other keys."""
    section = config.get(key)
    if section is None:
        raise ContractRuntimeError(f"inference_config.{key} must be set.")
    if not isinstance(section, Mapping) or not isinstance(section.get("_target_"), str):
        raise ContractError(f"inference_config.{key} must be a mapping with a `_target_` class path, got {section!r:.60}")
    flags = sorted(set(section) & set(HYDRA_FLAGS))
    extra = sorted(set(section) - set(known)) if known else flags
    if extra:
        raise ContractError(
            f"inference_config.{key} has key(s) {extra} that a job cannot record; "
            + ("allowed: " + ", ".join(known) if known else "remove the Hydra flags")
        )
    return dict(section)


def checked_input_key(config: Mapping[str, Any], contract: Any) -> Any:
    """``input_key``: set and not empty (RuntimeError), matching the contract's inputs."""
    input_key = config.get("input_key")
    if input_key is None:
        raise ContractRuntimeError("inference_config.input_key must be set.")
    if isinstance(input_key, list) and not input_key:
        raise ContractRuntimeError("inference_config.input_key must not be empty.")
    if contract is not None:
        contract.validate_input_keys(input_key)
    return input_key


def checked_output_keys(config: Mapping[str, Any]) -> Optional[List[str]]:
    """``output_keys`` as a list (a string is one key), or None; an empty one is refused."""
    output_keys = config.get("output_keys")
    if output_keys is None:
        return None
    output_keys = [output_keys] if isinstance(output_keys, str) else list(output_keys)
    if not output_keys:
        raise ContractRuntimeError("inference_config.output_keys must not be empty.")
    return output_keys


def provider_params(config: Mapping[str, Any], contract: Any) -> Dict[str, Any]:
    """The params infer hands the provider: ``provider.params``, then ``input_key``, ``idx_key``,
    ``output_keys``, the contract (and its root), ``output_fn_path``, ``output_artifacts``."""
    output_fn = config.get("output_fn")
    if contract is not None and output_fn:
        raise ContractError("output_fn cannot be combined with an inference contract (inference_config.contract is set)")
    if output_fn:
        import_object(output_fn, "inference_config.output_fn")
    params = dict(config["provider"].get("params") or {})
    params["input_key"] = checked_input_key(config, contract)
    params["idx_key"] = config.get("idx_key", "utt_id")
    params["output_keys"] = checked_output_keys(config)
    if contract is not None:
        params["inference_contract"] = config["contract"]
        if contract.imports:
            params["inference_contract_root"] = str(Path(config.get("recipe_dir") or ".").resolve())
    if output_fn:
        params["output_fn_path"] = output_fn
    params["output_artifacts"] = config.get("output_artifacts") or {}
    return params


def runner_options(config: Mapping[str, Any], output_keys: Optional[List[str]]) -> Dict[str, Any]:
    """The runner's recorded options: ``idx_key``, ``hyp_key`` (``output_keys`` or ``[]``),
    ``ref_key`` (``[]``), as infer passes them, then the ``runner:`` section's own keys."""
    section = required_section(config, "runner")
    taken = sorted(set(section) & set(INFER_RUNNER_ARGUMENTS))
    if taken:
        raise ContractError(
            f"inference_config.runner sets {taken}, which infer() passes itself (from the config's "
            "idx_key, output_keys, batch_size, inference_dir); set them there"
        )
    extras = {key: value for key, value in section.items() if key != "_target_"}
    return {"idx_key": config.get("idx_key", "utt_id"), "hyp_key": output_keys or [], "ref_key": [], **extras}


def parallel_settings(config: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The ``parallel:`` section, its keys checked (None when absent)."""
    parallel = config.get("parallel")
    if parallel is None:
        return None
    if not isinstance(parallel, Mapping):
        raise ContractError(f"inference_config.parallel must be a mapping, got {type(parallel).__name__}")
    unknown = sorted(set(parallel) - set(PARALLEL_KEYS))
    if unknown:
        raise ContractError(f"inference_config.parallel has unknown key(s) {unknown}; known: {', '.join(PARALLEL_KEYS)}")
    n_workers = parallel.get("n_workers", 1)
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ContractError(f"inference_config.parallel.n_workers must be a positive integer, got {n_workers!r}")
    return dict(parallel)


def shard_resources_of(parallel: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Per-shard resources from ``parallel.env`` / ``parallel.options`` (none without ``parallel:``)."""
    if parallel is None:
        return {}
    from espnet3_rules.engine.cluster_options import shard_resources

    return shard_resources(str(parallel.get("env", "local")), parallel.get("options") or {})


def inference_jobs(config: Any, name: str = "infer") -> List[JobSpec]:
    """Per test set of an ESPnet3 inference config, the job ``infer(config)`` runs.

    Args:
        config: The inference config (a ``DictConfig`` or mapping): ``dataset.test[].name``,
            ``inference_dir``, ``input_key``, ``provider`` / ``runner`` (Hydra ``_target_``),
            optional ``idx_key``, ``output_keys``, ``output_fn``, ``batch_size``,
            ``output_artifacts``, ``contract``, ``parallel``.
        name: The jobs' name.

    Returns:
        One :class:`JobSpec` per test set, in config order (``_target_`` paths under
        ``espnet3.`` switched to ``espnet3_rules.``, see :func:`switch_targets`): root ``<inference_dir>/<test>``
        (``output_dir``; no ``shard_subdir``, as infer passes it), provider/runner from the
        ``_target_`` paths, ``provider_config`` = the resolved config (less ``parallel``) with
        ``test_set``, the params and runner options infer passes, ``n_shards`` =
        ``parallel.n_workers`` (1 without one), ``resources`` from ``parallel``.

    Raises:
        RuntimeError, AssertionError, ValueError, TypeError, AttributeError: As
            ESPnet3's ``infer`` for the same config, as :class:`ContractError` subclasses.
    """
    from espnet3_rules.contract.inference import load_inference_contract

    plain = switch_targets(as_plain(config))
    contract = load_inference_contract(plain.get("contract"))
    names = test_set_names(plain)
    if plain.get("inference_dir") in (None, ""):
        raise ContractAttributeError("inference_config.inference_dir must be set: outputs go to <inference_dir>/<test>")
    provider = required_section(plain, "provider", PROVIDER_KEYS)
    params = provider_params(plain, contract)
    options = runner_options(plain, params["output_keys"])
    parallel = parallel_settings(plain)
    runner = plain["runner"]["_target_"]
    provider_config = {key: value for key, value in plain.items() if key != "parallel"}
    return [
        JobSpec(
            name=name,
            runner=runner,
            provider=provider["_target_"],
            output_dir=str(Path(plain["inference_dir"]) / test_name),
            n_shards=(parallel or {}).get("n_workers", 1),
            batch_size=plain.get("batch_size"),
            provider_config={**provider_config, "test_set": test_name},
            params=jsonable(params),
            runner_kwargs=jsonable(options),
            test_set=test_name,
            resources=shard_resources_of(parallel),
        )
        for test_name in names
    ]
