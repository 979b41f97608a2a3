"""``runner(indices)`` with a parallel config: the pending shards as Snakemake jobs of ``rule shard``.

The caller plans, writes ``manifest.json`` and locks the pending shards as without a
parallel config; :func:`run_shards` then runs exactly those shards through
``snakemake.api`` with ``workflow/planned.smk`` (the project's ``rules/shard.smk`` over
the planned manifests), so ``split.N/``, ``done`` and ``logs/split.N.log`` are what
``snakemake`` on the command line writes. The env picks the executor:

- ``local``: the local executor, ``n_workers`` shards at once;
- ``local_gpu``: the same, every shard one GPU of its own (``cli/gpu.py`` picks it);
- ``slurm``: the SLURM executor plugin, every shard one sbatch job, ``n_workers`` in flight.

Snakemake runs in the caller's working directory (where a shard process must run: a
provider's relative paths mean what they mean to the caller); its log file goes to
``.snakemake/log/`` there, its console output is replaced by one progress bar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from espnet3_rules.engine.contracts import ContractError, ContractRuntimeError
from espnet3_rules.engine.job import JobSpec
from espnet3_rules.engine.plan import ShardPlan, read_manifest

__all__ = ["SNAKEMAKE_ENVS", "ShardsFailed", "check_env_name", "check_importable", "jobs_from_manifests",
           "run_shards", "workflow_file"]

#: The parallel config's envs that run here, and the ESPnet3 (Dask-jobqueue) envs that do not.
SNAKEMAKE_ENVS = ("local", "local_gpu", "slurm")
DASK_ONLY_ENVS = ("htcondor", "lsf", "moab", "oar", "pbs", "sge", "ssh", "kube")
#: The entry workflow, relative to the package's parent (the project root of the editable install).
PLANNED_WORKFLOW = Path("workflow") / "planned.smk"


class ShardsFailed(ContractRuntimeError):
    """Shards of ``runner(indices)`` failed under Snakemake (the others finished)."""


def workflow_file() -> Path:
    """``workflow/planned.smk`` of the project this package belongs to."""
    path = Path(__file__).resolve().parents[2] / PLANNED_WORKFLOW
    if not path.is_file():
        raise ContractRuntimeError(
            f"{path} not found: runner(indices) with a parallel config runs the project's Snakemake "
            "workflow, which an install without workflow/ lacks (install the project editable)"
        )
    return path


def check_env_name(env: Any) -> str:
    """``env`` if it runs here; ESPnet3's other cluster envs and unknown names are refused."""
    if env in SNAKEMAKE_ENVS:
        return env
    if env in DASK_ONLY_ENVS:
        raise ContractError(
            f"parallel env {env!r} is not supported here; use a Snakemake executor plugin with the "
            "workflow (snakemake --executor ...), or env local, local_gpu or slurm"
        )
    raise ContractError(f"Unknown env: {env} (supported: {', '.join(SNAKEMAKE_ENVS)})")


def check_importable(job: JobSpec) -> None:
    """A shard process imports the runner and provider by path: one defined in ``__main__`` or
    inside a function cannot be imported there."""
    for role, path in (("runner", job.runner), ("provider", job.provider)):
        if path.startswith("__main__.") or "<locals>" in path:
            where = "in __main__" if path.startswith("__main__.") else "inside a function"
            raise ContractError(
                f"{role} class {path.rsplit('.', 1)[-1]} is defined {where}, which a shard process cannot "
                "import; move it to a module (runner(indices) with a parallel config runs shards in "
                "their own processes)"
            )


def jobs_from_manifests(paths: Iterable[Any]) -> Dict[str, JobSpec]:
    """The jobs of planned ``manifest.json`` files, keyed by their root (as ``jobs_from_config``)."""
    jobs: Dict[str, JobSpec] = {}
    for path in paths:
        plan = read_manifest(path)
        jobs[plan.root.as_posix()] = plan.job
    return jobs


@dataclass
class Execution:
    """How one env runs the shards: the executor and Snakemake's limits."""

    executor: str
    cores: Optional[int] = None
    nodes: Optional[int] = None
    resources: Dict[str, int] = field(default_factory=dict)


def execution(env: str, n_workers: int, threads: int) -> Execution:
    """The Snakemake executor and limits that run ``n_workers`` shards of ``threads`` threads at once."""
    if env == "slurm":
        return Execution("slurm", nodes=n_workers)
    if env == "local_gpu":
        check_gpu_count(n_workers)
        return Execution("local", cores=n_workers * threads, resources={"gpu": n_workers})
    return Execution("local", cores=n_workers * threads)


def check_gpu_count(n_workers: int) -> None:
    """As ESPnet3's ``local_gpu``: more workers than GPUs is refused; fewer leaves GPUs idle (warned)."""
    from espnet3_rules.cli.gpu import local_gpu_ids

    num_gpus = len(local_gpu_ids())
    if n_workers > num_gpus:
        raise ContractError(f"n_workers={n_workers} > num_gpus={num_gpus}")
    if n_workers < num_gpus:
        warnings.warn(f"n_workers={n_workers} < num_gpus={num_gpus}, some GPUs may be idle.", stacklevel=3)


def shard_process_env() -> Dict[str, str]:
    """Environment entries that let a shard process import what the caller imports: the caller's
    ``sys.path`` as ``PYTHONPATH`` and its interpreter first on ``PATH``."""
    entries = [os.path.abspath(p or os.curdir) for p in sys.path]
    python_path = os.pathsep.join(dict.fromkeys(p for p in entries if os.path.isdir(p)))
    bin_dir = os.path.dirname(sys.executable)
    return {"PYTHONPATH": python_path, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


@contextlib.contextmanager
def environment(updates: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` updated for the block (Snakemake's jobs inherit it), then restored."""
    before = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_workflow_config(plans: Sequence[ShardPlan]) -> Path:
    """A config file naming the manifests (a file, so that SLURM jobs read the same config)."""
    manifests = [str(plan.manifest_path.resolve()) for plan in plans]
    text = json.dumps({"manifests": manifests}, indent=1)
    path = Path(".snakemake") / "espnet3_rules" / f"planned-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


class ShardProgress(logging.Handler):
    """One tqdm bar over the pending shards, fed by Snakemake's job events."""

    def __init__(self, targets: Mapping[str, str]):
        """``targets``: each shard's ``done`` path -> its name in messages."""
        super().__init__(logging.INFO)
        from tqdm import tqdm

        self.targets = dict(targets)
        self.shards: Dict[int, Tuple[str, str]] = {}  # Snakemake job id -> (name, log)
        self.running: set = set()
        self.failed: List[Tuple[str, str]] = []
        self.bar = tqdm(total=len(self.targets), desc="shards", unit="shard", leave=True)
        self._lock = threading.Lock()
        self._refresh()

    def emit(self, record: logging.LogRecord) -> None:
        """Follow JOB_INFO (a job starts: which shard it is), JOB_FINISHED and JOB_ERROR."""
        event = str(getattr(record, "event", ""))
        with self._lock:
            if event == "job_info":
                name = next((self.targets[o] for o in getattr(record, "output", []) if o in self.targets), None)
                if name is None:
                    return
                self.shards[record.jobid] = (name, (getattr(record, "log", None) or [""])[0])
                self.running.add(record.jobid)  # logged as the job starts
            elif event == "job_finished" and record.job_id in self.shards:
                self.running.discard(record.job_id)
                self.bar.update(1)
            elif event == "job_error" and record.jobid in self.shards:
                self.running.discard(record.jobid)
                name, log = self.shards[record.jobid]
                self.failed.append((name, log))
                self.bar.write(f"espnet3-rules: {name} failed; see {log}")
            else:
                return
            self._refresh()

    def _refresh(self) -> None:
        self.bar.set_postfix(running=len(self.running), failed=len(self.failed), refresh=True)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
        super().close()


#: Seconds a Ctrl-C'd runner(indices) gives its local shards to stop at the end of their item.
TERMINATE_GRACE_S = 5.0


def terminate_local_jobs(grace_s: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM every running local job's process tree (its shell, the shard process), then SIGKILL
    what is left after ``grace_s``.

    On ``KeyboardInterrupt`` Snakemake's local executor waits for its running jobs: on the
    command line, Ctrl-C reached them too (one process group); a caller's SIGINT may not have.
    A shard stops at the end of its current item on SIGTERM (committing its journal); one whose
    item takes longer than ``grace_s`` is killed (its last commit stands), and a killed fork-server
    client takes its forked shard with it. The SLURM executor scancels its jobs itself.
    """
    import psutil  # a dependency of Snakemake
    from snakemake.shell import shell

    with shell._lock:  # Snakemake's own table of running shell jobs
        roots = [proc.pid for proc in shell._processes.values()]
    processes = []
    for root in roots:
        try:
            tree = psutil.Process(root)
            processes += [tree, *tree.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@contextlib.contextmanager
def interrupt_flag() -> Iterator[List[bool]]:
    """Note a SIGINT (Snakemake cancels its jobs on it, then returns instead of raising)."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def note(signum: int, frame: Any) -> None:
        flag[0] = True
        terminate_local_jobs()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def run_shards(plan: ShardPlan, shard_ids: Sequence[int], env: str, n_workers: int) -> None:
    """Run shards ``shard_ids`` of ``plan`` (its manifest written) as Snakemake jobs, forced.

    Args:
        plan: The planned job.
        shard_ids: The pending shards (the caller holds their locks).
        env: ``local``, ``local_gpu`` or ``slurm``.
        n_workers: Shards at once.

    Raises:
        ShardsFailed: Some shards failed (the others ran to their end); names each one and its log.
        KeyboardInterrupt: After Snakemake cancelled the running shards.
    """
    from espnet3_rules.cli.config import shard_resource

    snakefile = workflow_file()
    how = execution(check_env_name(env), max(1, n_workers), int(shard_resource(plan.job, "threads")))
    targets = {str(plan.shard_dir(i) / "done"): f"shard {i} of {plan.root.as_posix()}" for i in shard_ids}
    config_file = write_workflow_config([plan])
    progress = ShardProgress(targets)
    try:
        with environment(shard_process_env()), interrupt_flag() as interrupted:
            try:
                ok = _execute(snakefile, config_file, how, sorted(targets), progress)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - Snakemake's own errors, as one line
                if interrupted[0]:
                    raise KeyboardInterrupt from None
                if not progress.failed:
                    raise ContractRuntimeError(f"Snakemake could not run the shards of {plan.root}: {exc}") from exc
                ok = False
            if interrupted[0]:
                raise KeyboardInterrupt
    finally:
        progress.close()
    if progress.failed or not ok:
        failed = "; ".join(f"{name} (log: {log})" for name, log in progress.failed) or "see .snakemake/log/"
        raise ShardsFailed(f"{len(progress.failed) or 'some'} shard(s) failed under Snakemake: {failed}")


def _execute(snakefile: Path, config_file: Path, how: Execution, targets: List[str], progress: ShardProgress) -> bool:
    """One ``snakemake.api`` run of ``targets`` (forced, keep-going, our locks instead of Snakemake's)."""
    from snakemake.api import SnakemakeApi
    from snakemake.scheduling.greedy import SchedulerSettings as GreedySchedulerSettings
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        ExecutionSettings,
        OutputSettings,
        ResourceSettings,
        SchedulingSettings,
    )

    with SnakemakeApi(OutputSettings(printshellcmds=False)) as api:
        logger = api.logger_manager.logger
        for handler in list(logger.handlers):
            if handler.name == "DefaultStreamHandler":
                logger.removeHandler(handler)
        logger.addHandler(progress)
        propagate, logger.propagate = logger.propagate, False
        try:
            workflow = api.workflow(
                resource_settings=ResourceSettings(cores=how.cores, nodes=how.nodes, resources=how.resources),
                config_settings=ConfigSettings(configfiles=[config_file.resolve()]),
                snakefile=snakefile,
                workdir=Path.cwd(),
            )
            dag = workflow.dag(DAGSettings(targets=frozenset(targets), forcetargets=True, force_incomplete=True))
            dag.execute_workflow(
                executor=how.executor,
                execution_settings=ExecutionSettings(keep_going=True, lock=False, latency_wait=60),
                executor_settings=_executor_settings(how.executor),
                # independent shards of one rule: nothing for the ILP scheduler to weigh
                scheduling_settings=SchedulingSettings(scheduler="greedy"),
                scheduler_settings=GreedySchedulerSettings(),
            )
        finally:
            logger.propagate = propagate
            logger.removeHandler(progress)
    return True


def _executor_settings(executor: str) -> Any:
    """The SLURM plugin's settings as the profile (config/slurm) sets them; ``None`` for local."""
    if executor != "slurm":
        return None
    from snakemake_executor_plugin_slurm import ExecutorSettings

    return ExecutorSettings(status_command="squeue", init_seconds_before_status_checks=1)
