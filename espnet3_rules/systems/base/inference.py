"""ESPnet3's inference stage, ``infer(config)``, at its path (``espnet3.systems.base.inference``).

The config is checked and mapped onto one job per test set by
:func:`~espnet3_rules.systems.base.inference_jobs.inference_jobs` (the mapping the
``import-espnet3`` converter writes too); each test set's provider and runner are then
built through Hydra, as ESPnet3 builds them, and ``runner(indices)`` runs it through
the engine (with a parallel config set, its shards through Snakemake).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from espnet3_rules.engine.contracts import ContractRuntimeError, ContractTypeError
from espnet3_rules.engine.job import JobSpec
from espnet3_rules.parallel.parallel import set_parallel
from espnet3_rules.systems.base.inference_jobs import inference_jobs

log = logging.getLogger(__name__)


def build_provider(job: JobSpec) -> Any:
    """``instantiate(provider, inference_config=<its config>, params=<its params>)``, as infer builds it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    inference_config = OmegaConf.create(job.provider_config)
    return instantiate(
        {"_target_": job.provider}, inference_config=inference_config, params=dict(job.params), _recursive_=False
    )


def build_runner(job: JobSpec, provider: Any) -> Any:
    """``instantiate(runner, provider=, idx_key=, hyp_key=, ref_key=, batch_size=, output_dir=)``, as infer
    builds it (the ``runner:`` section's own keys with them)."""
    from hydra.utils import instantiate

    runner = instantiate(
        {"_target_": job.runner, **job.runner_kwargs},
        provider=provider,
        batch_size=job.batch_size,
        output_dir=Path(job.output_dir),
    )
    if not hasattr(runner, "idx_key"):
        raise ContractTypeError(
            f"{type(runner).__name__} must provide inference runner attributes (idx_key; inference_config.runner)"
        )
    return runner


def run_test_set(job: JobSpec) -> None:
    """Build one test set's provider and runner, and run the runner over the whole dataset."""
    provider = build_provider(job)
    runner = build_runner(job, provider)
    Path(job.output_dir).mkdir(parents=True, exist_ok=True)
    dataset = provider.build_dataset(getattr(provider, "config", None))
    n_items = len(dataset)
    if n_items == 0:
        raise ContractRuntimeError(
            f"Test dataset '{job.test_set}' is empty. Please check the dataset manifest and preprocessing outputs."
        )
    log.info("===> Processing %d samples..", n_items)
    result = runner(list(range(n_items)))
    if isinstance(result, list):
        raise ContractRuntimeError(
            "In-memory inference results are not supported. Use a runner that writes shard outputs via "
            f"BaseRunner hooks ({type(runner).__name__}(indices) returned a list)."
        )
    if result is not True:
        raise ContractRuntimeError(
            "Inference runner did not produce shard outputs. Use a runner that writes outputs via BaseRunner "
            f"hooks ({type(runner).__name__}(indices) returned {result!r:.40}, not True)."
        )


def infer(config: Any) -> None:
    """Run inference over every test set of ``config``: ``<inference_dir>/<test>/<field>.scp``.

    As ESPnet3 202611: ``set_parallel(config.parallel)`` first (``None`` sets one local
    worker); per ``dataset.test`` entry, the provider is ``instantiate(config.provider,
    inference_config=config, params=...)`` with ``config.test_set`` set to the test name and
    params ``input_key``, ``idx_key``, ``output_keys``, ``output_fn_path``,
    ``output_artifacts`` (and the ``contract``), the runner ``instantiate(config.runner,
    provider=, idx_key=, hyp_key=output_keys or [], ref_key=[], batch_size=,
    output_dir=<inference_dir>/<test>)``, and ``runner(list(range(len(dataset))))`` must
    return True. Shards write ``split.N/<field>.scp`` (non-scalar values as
    ``split.N/<field>/<id>.*``) and the merge concatenates them.

    Args:
        config: The inference config (``DictConfig`` or mapping); see
            :func:`~espnet3_rules.systems.base.inference_jobs.inference_jobs`.

    Returns:
        None.

    Raises:
        RuntimeError: An unnamed test set, no ``input_key`` / ``provider`` / ``runner``,
            an empty dataset, a runner that does not return True.
        AssertionError: No test set, or a name twice.
        ValueError: ``output_fn`` with a ``contract``, and other config errors.
    """
    start = time.perf_counter()
    set_parallel(config.get("parallel"))
    jobs = inference_jobs(config)
    log.info("Starting inference | inference_dir=%s test_sets=%s", config.get("inference_dir"),
             [job.test_set for job in jobs])  # fmt: skip
    for job in jobs:
        log.info("===> Processing test set: %s", job.test_set)
        run_test_set(job)
        log.info("Finished test set %s | outputs=%s", job.test_set, job.output_dir)
    log.info("Inference finished in %.2fs", time.perf_counter() - start)
