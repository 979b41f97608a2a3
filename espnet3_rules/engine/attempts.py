"""A shard's story: each run of it (attempt) with its outcome, timing, memory and progress.

:func:`~espnet3_rules.engine.shard.run_shard` records every attempt in
``split.N/attempts.json``: when it began and ended, on which host and pid (and
SLURM job), the item it resumed at, the items finished so far (rewritten every
:data:`PROGRESS_SECONDS` while it runs), its CPU time and peak RSS, and how it ended:
``done``, ``failed`` (with the error's line), ``interrupted`` (SIGTERM), or, for an
attempt that never ended (SIGKILL, OOM kill, node loss), ``null``.

The file keeps the attempts of one plan since the shard was last done: a changed plan
or a rerun of a finished shard starts a new story. ``status`` and the report read it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from espnet3_rules.engine.files import atomic_path

ATTEMPTS_NAME = "attempts.json"
#: A running attempt rewrites its progress at most this often.
PROGRESS_SECONDS = 2.0

logger = logging.getLogger(__name__)


def read_attempts(shard_dir: Path, fingerprint: str) -> List[Dict[str, Any]]:
    """The attempts recorded for this plan, oldest first (``[]``: none, unreadable, another plan)."""
    try:
        data = json.loads((Path(shard_dir) / ATTEMPTS_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint or not isinstance(data.get("attempts"), list):
        return []
    return data["attempts"]


def resource_usage() -> Dict[str, float]:
    """``{cpu_s, peak_rss_mb}`` of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def describe_usage(usage: Dict[str, Any]) -> str:
    """``"1.20 s CPU, 216 MB peak RSS"`` of a :func:`resource_usage`."""
    return f"{usage['cpu_s']:.2f} s CPU, {usage['peak_rss_mb']:.0f} MB peak RSS"


class Attempt:
    """The attempt being run, written to ``split.N/attempts.json`` at its start, while it runs, and at its end.

    Args:
        shard_dir: The shard's directory.
        fingerprint: The plan's fingerprint.
        n_items: Items (batches with ``batch_size``) in the shard.
        log: The shard's log file, where it has one (the shard rule's ``log:``).
        started: When the attempt began (default: now); the CLI passes its start, before the provider was built.
    """

    def __init__(
        self, shard_dir: Path, fingerprint: str, n_items: int, log: Optional[str] = None, started: Optional[float] = None
    ) -> None:
        self.path: Optional[Path] = Path(shard_dir) / ATTEMPTS_NAME
        self.fingerprint = fingerprint
        earlier = read_attempts(shard_dir, fingerprint)
        if earlier and earlier[-1].get("outcome") == "done":
            earlier = []
        self.earlier = earlier
        self.cpu_at_start = resource_usage()["cpu_s"]
        self.record: Dict[str, Any] = {
            "started": time.time() if started is None else started,
            "updated": time.time(),
            "ended": None,
            "outcome": None,
            "n_items": n_items,
            "resumed_at": 0,
            "items_done": 0,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "log": log,
            "error": None,
        }
        self.written_at = 0.0
        self.write()

    def resumed_at(self, n_done: int) -> None:
        """The attempt continues a commit of ``n_done`` items (0: from the start)."""
        if n_done:
            self.record["resumed_at"] = self.record["items_done"] = n_done
            self.write()

    def progress(self, n_done: int) -> None:
        """``n_done`` items are finished; written when the last write is :data:`PROGRESS_SECONDS` old."""
        self.record["items_done"] = n_done
        if time.monotonic() - self.written_at >= PROGRESS_SECONDS:
            self.write()

    def end(self, outcome: str, error: Optional[BaseException] = None) -> None:
        """Record how the attempt ended (``done``, ``failed``, ``interrupted``)."""
        usage = resource_usage()
        self.record.update(
            ended=time.time(),
            outcome=outcome,
            cpu_s=round(usage["cpu_s"] - self.cpu_at_start, 3),
            peak_rss_mb=round(usage["peak_rss_mb"], 1),
            error=None if error is None else f"{type(error).__name__}: {error}".splitlines()[0][:500],
        )
        if outcome == "done":
            self.record["items_done"] = self.record["n_items"]
        self.write()

    def write(self) -> None:
        """Replace ``attempts.json`` (atomically; not fsynced: it is a record, not a result).

        A record that cannot be written (disk full, read-only) is warned about once and
        given up: the shard goes on, and fails, if it does, where its results are written.
        """
        if self.path is None:
            return
        self.record["updated"] = time.time()
        data = {"fingerprint": self.fingerprint, "attempts": [*self.earlier, self.record]}
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        except OSError as exc:
            logger.warning("%s: cannot record the shard's attempt (%s); status and the report will lack it", self.path, exc)
            self.path = None
        self.written_at = time.monotonic()
