"""``python -m espnet3_rules status``: per job, which shards are done, running, failed or pending.

A shard's state comes from its fingerprinted ``done`` and its ``attempts.json``
(:mod:`espnet3_rules.engine.attempts`): the last attempt of the plan tells a running
shard (items done so far) from one that failed, was interrupted, or was killed
(an attempt that never ended, whose process is gone).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional

from espnet3_rules.cli.config import jobs_named
from espnet3_rules.engine.attempts import read_attempts
from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.engine.job import JobSpec, job_label
from espnet3_rules.engine.merge import MERGE_DONE_NAME
from espnet3_rules.engine.plan import MANIFEST_NAME, ShardPlan, read_manifest
from espnet3_rules.engine.shard import is_shard_done, lock_owner_gone

#: Shard states, in the order the summary counts them.
STATES = ("done", "running", "failed", "pending")


@dataclass
class ShardStatus:
    """What is known of one shard: its state and, where it ran, its last attempt."""

    shard: int
    state: str
    n_items: int
    items_done: int = 0
    attempts: int = 0
    outcome: Optional[str] = None
    log: Optional[str] = None
    error: Optional[str] = None
    host: Optional[str] = None
    pid: Optional[int] = None
    slurm_job_id: Optional[str] = None
    updated: Optional[float] = None


@dataclass
class JobStatus:
    """The shards of one job (or test set) root; ``plan`` is its one-line summary, ``unit`` what the
    shards' item counts count (``batches`` with ``batch_size``)."""

    root: str
    job: str
    test_set: Optional[str]
    planned: bool
    merged: bool = False
    plan: str = ""
    unit: str = "items"
    shards: List[ShardStatus] = field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        """Shards per state."""
        return {state: sum(shard.state == state for shard in self.shards) for state in STATES}

    def to_dict(self) -> Dict[str, Any]:
        """The status as JSON-ready data (``--json``)."""
        return {**asdict(self), "counts": self.counts()}


def attempt_state(attempt: Dict[str, Any]) -> str:
    """``running``, ``failed`` or ``pending`` for a shard whose last attempt is ``attempt`` (it has no ``done``).

    An attempt that never ended is running unless its process is known to be gone (same
    host, no such pid): then it was killed. One that ended ``done`` lost its ``done`` since.
    """
    if attempt["outcome"] is None:
        gone = lock_owner_gone({"pid": attempt["pid"], "host": attempt["host"]})
        return "failed" if gone else "running"
    return "pending" if attempt["outcome"] == "done" else "failed"


def shard_status(plan: ShardPlan, shard_id: int) -> ShardStatus:
    """The state of one shard of ``plan``."""
    n_items = len(plan.shards[shard_id])
    attempts = read_attempts(plan.shard_dir(shard_id), plan.fingerprint)
    if is_shard_done(plan, shard_id):
        return ShardStatus(shard_id, "done", n_items, n_items, len(attempts), "done",
                           attempts[-1]["log"] if attempts else None)
    if not attempts:
        return ShardStatus(shard_id, "pending", n_items)
    last = attempts[-1]
    state = attempt_state(last)
    outcome = "killed" if state == "failed" and last["outcome"] is None else last["outcome"]
    return ShardStatus(
        shard_id, state, n_items, last["items_done"], len(attempts), outcome, last["log"], last["error"],
        last["host"], last["pid"], last["slurm_job_id"], last["updated"],
    )


def job_status(job: JobSpec) -> JobStatus:
    """The status of every shard of ``job`` (not planned: no ``manifest.json`` yet)."""
    root = job.root
    status = JobStatus(root.as_posix(), job.name, job.test_set, planned=(root / MANIFEST_NAME).exists())
    if not status.planned:
        return status
    plan = read_manifest(root / MANIFEST_NAME)
    status.merged = (root / MERGE_DONE_NAME).exists()
    status.plan = plan.summary()
    status.unit = "batches" if plan.job.batch_size else "items"
    status.shards = [shard_status(plan, i) for i in range(plan.n_shards)]
    return status


def select_jobs(jobs: Iterable[JobSpec], name: Optional[str]) -> List[JobSpec]:
    """The jobs ``name`` selects (a job name, or ``job/test_set``); all where ``name`` is ``None``."""
    jobs = list(jobs)
    if name is None:
        return jobs
    selected = jobs_named(jobs, name)
    if not selected:
        raise ContractError(f"job {name!r} is not in the config; jobs are {sorted({job.name for job in jobs})}")
    return selected


def describe(status: JobStatus, now: Optional[float] = None) -> List[str]:
    """The lines ``status`` prints for one job."""
    label = job_label(status.job, status.test_set)
    if not status.planned:
        return [f"{status.root} ({label}): not planned yet"]
    counts = status.counts()
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    merged = "; merged" if status.merged else ""
    lines = [f"{status.root} ({label}): {status.plan}; {summary}{merged}"]
    now = time.time() if now is None else now
    for shard in status.shards:
        if shard.state == "running":
            where = f"host {shard.host}, pid {shard.pid}" + (f", SLURM job {shard.slurm_job_id}" if shard.slurm_job_id else "")
            lines.append(f"  running split.{shard.shard}: {shard.items_done}/{shard.n_items} {status.unit}"
                         f" ({where}; updated {now - shard.updated:.0f} s ago)")
        elif shard.state == "failed":
            why = f"{shard.outcome}: {shard.error}" if shard.error else shard.outcome
            lines.append(f"  failed  split.{shard.shard}: {why} (attempt {shard.attempts}, "
                         f"{shard.items_done}/{shard.n_items} {status.unit}); log: {shard.log or 'none'}")
    pending = [f"split.{shard.shard}" for shard in status.shards if shard.state == "pending"]
    if pending:
        lines.append(f"  pending: {' '.join(pending)}")
    return lines


def report_status(jobs: Iterable[JobSpec], as_json: bool = False) -> int:
    """Print the status of ``jobs`` (text or JSON); 0 where every shard is done, else 3."""
    statuses = [job_status(job) for job in jobs]
    if as_json:
        print(json.dumps({"jobs": [status.to_dict() for status in statuses]}, indent=1))
    else:
        for status in statuses:
            print("\n".join(describe(status)))
    all_done = all(status.planned and status.counts()["done"] == len(status.shards) for status in statuses)
    return 0 if all_done else 3
