"""Run one shard: forward over its items through the runner's hooks, atomic ``done`` last.

Only the public ESPnet3 contract of the runner class is used: ``init_state``,
``forward``, ``reduce_state`` (or, where it is the standard one, ``write_record``
directly), ``finalize_state``.

Shard locks (``split.N/lock``) keep two ``runner(indices)`` calls on one output dir
from running the same shard at once. Snakemake shard jobs (``run-shard``) take none:
Snakemake locks its working directory itself, and a shard job requeued on another
host must not be refused by the lock of the one that died.

A shard commits its progress to a journal as it runs (:mod:`espnet3_rules.engine.journal`);
a rerun of the same plan continues at the first uncommitted item where the runner's
writers can resume (:func:`writers_resumable`), and from item 0 otherwise.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from espnet3_rules.engine.attempts import Attempt
from espnet3_rules.engine.contracts import (
    ContractError,
    ContractRuntimeError,
    check_env,
    check_forward_env,
    check_setup_fn,
    env_kwargs,
)
from espnet3_rules.engine.files import atomic_path, write_json_atomic
from espnet3_rules.engine.job import shard_env
from espnet3_rules.engine.journal import (
    Committed,
    Journal,
    discard_journal,
    file_name,
    file_sizes,
    read_journal,
    restored_state,
    truncate_files,
)
from espnet3_rules.engine.plan import ShardPlan

DONE_NAME = "done"
STATE_NAME = "_state.pkl"
LOCK_NAME = "lock"

logger = logging.getLogger(__name__)

#: Attribute that marks a base class's standard hook, so the shard loop may skip calling it:
#: ``"fold_via_write_record"`` on a ``reduce_state`` that only calls ``write_record``;
#: ``"append_to_records"`` on a ``write_record`` that only appends to ``state["records"]``.
STANDARD_HOOK = "_espnet3_rules_standard_hook"

#: The hooks that :data:`RESUMABLE` on a class vouches for: a subclass overriding one must say it again.
WRITER_HOOKS = ("open_writers", "write_record", "close_writers", "journal_files", "reopen_writers")
#: Class attribute by which a runner says its writers resume (see ``BaseRunner.resumable_writers``).
RESUMABLE = "resumable_writers"


class ShardInterrupted(RuntimeError):
    """A signal (SIGTERM) stopped the shard after it committed what it had finished."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def standard_hook(kind: str) -> Callable[[Callable], Callable]:
    """Mark a base-class hook as the standard one (see :data:`STANDARD_HOOK`)."""

    def mark(fn: Callable) -> Callable:
        setattr(fn, STANDARD_HOOK, kind)
        return fn

    return mark


def build_worker_env(provider: Any) -> Dict[str, Any]:
    """A shard process's env: ``provider.build_worker_setup_fn()()``, checked on the way."""
    setup = check_setup_fn(provider, provider.build_worker_setup_fn())
    return check_env(provider, setup())


def done_path(shard_dir: Path) -> Path:
    """The ``split.N/done`` marker."""
    return Path(shard_dir) / DONE_NAME


def read_done(shard_dir: Path) -> Optional[Dict[str, Any]]:
    """The ``done`` record of a shard, or ``None`` if absent or unreadable (a torn write)."""
    try:
        record = json.loads(done_path(shard_dir).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def is_shard_done(plan: ShardPlan, shard_id: int) -> bool:
    """True only if the shard's ``done`` was written by a run of this very plan."""
    return (read_done(plan.shard_dir(shard_id)) or {}).get("fingerprint") == plan.fingerprint


def lock_path(shard_dir: Path) -> Path:
    """The ``split.N/lock`` of a shard run by ``runner(indices)``."""
    return Path(shard_dir) / LOCK_NAME


def _read_lock(path: Path) -> Optional[bytes]:
    """The lock file's bytes, or ``None`` if it is gone."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _lock_owner(held: bytes) -> Optional[Dict[str, Any]]:
    """``{pid, host, started}`` of a lock file, or ``None`` if unreadable (e.g. ESPnet3's bare pid)."""
    try:
        owner = json.loads(held.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(owner, dict) or type(owner.get("pid")) is not int or not isinstance(owner.get("host"), str):
        return None
    return owner


def lock_owner_gone(owner: Dict[str, Any]) -> bool:
    """True only if the owner ran on this host and no process has its pid any more."""
    if owner["host"] != socket.gethostname() or owner["pid"] <= 0:
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def _judge_held_lock(shard_dir: Path, held: bytes, allow_overwrite: bool) -> None:
    """Return if the held lock may be taken over (owner gone, or ``allow_overwrite``); raise otherwise."""
    owner = _lock_owner(held)
    who = "unreadable lock"
    if owner is not None:
        who = f"pid {owner['pid']} on host {owner['host']} since {owner.get('started')}"
    if owner is not None and lock_owner_gone(owner):
        logger.warning("%s: taking over the lock of a runner that is gone (%s)", shard_dir, who)
    elif allow_overwrite:
        logger.warning("%s: overwriting the lock (%s): allow_overwrite_lock is set", shard_dir, who)
    else:
        raise ContractRuntimeError(
            f"Shard is already locked by another runner: {shard_dir} ({who}); if that run is gone, "
            "set allow_overwrite_lock: true in the parallel config (set_parallel) to take the lock over"
        )


def take_shard_lock(shard_dir: Path, allow_overwrite: bool = False) -> bytes:
    """Create ``split.N/lock`` atomically (``O_EXCL``) holding ``{pid, host, started}``.

    An existing lock is taken over if its owner ran on this host and is gone, or
    with ``allow_overwrite`` (another host's or an unreadable lock: only when that run
    is known to be gone); otherwise :class:`ContractRuntimeError` names its owner.

    Returns:
        The lock's content, for :func:`release_shard_lock`.
    """
    path = lock_path(shard_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode("utf-8")
    for _ in range(3):  # a lock removed or replaced between the attempts: judge the new one
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(path)
            if held is not None:
                _judge_held_lock(Path(shard_dir), held, allow_overwrite)
                release_shard_lock(shard_dir, held)
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(record)
        return record
    raise ContractRuntimeError(f"Shard is already locked by another runner: {shard_dir} (its lock keeps changing)")


def release_shard_lock(shard_dir: Path, held: bytes) -> None:
    """Remove ``split.N/lock`` if it still holds ``held`` (not a lock someone else took since)."""
    path = lock_path(shard_dir)
    if _read_lock(path) == held:
        path.unlink(missing_ok=True)


def save_state(state: Dict[str, Any], shard_dir: Path) -> Path:
    """Persist a finalized shard state as ``split.N/_state.pkl`` (atomically)."""
    path = Path(shard_dir) / STATE_NAME
    try:
        with atomic_path(path, durable=True) as tmp, tmp.open("wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ContractError(
            f"shard state of {shard_dir} cannot be pickled ({exc}); return picklable values "
            "from forward/close_writers or stream results to files with writer hooks"
        ) from exc
    return path


def load_state(shard_dir: Path) -> Dict[str, Any]:
    """Read a shard state written by :func:`save_state`."""
    with (Path(shard_dir) / STATE_NAME).open("rb") as f:
        return pickle.load(f)


def record_folder(runner_cls: type, shard_id: int, env: Dict[str, Any]) -> Tuple[str, Optional[Callable], Dict[str, Any]]:
    """How the shard loop folds each ``forward`` result into the state, the env bound once per shard.

    - ``("reduce", reduce_state, env)``: ``state = reduce_state(state, result, **env)`` (ESPnet3's loop);
    - ``("write", write_record, kwargs)`` where ``reduce_state`` is the standard one:
      ``write_record(state["_writers"], result, state, **kwargs)``, with no frame in between;
    - ``("append", None, {})`` where ``write_record`` is also standard: results go to ``state["records"]``.
    """
    hook_env = {"shard_id": shard_id, **env}
    if getattr(runner_cls.reduce_state, STANDARD_HOOK, None) != "fold_via_write_record":
        return "reduce", runner_cls.reduce_state, hook_env
    write_record = runner_cls.write_record
    if getattr(write_record, STANDARD_HOOK, None) == "append_to_records":
        return "append", None, {}
    return "write", write_record, env_kwargs(write_record, hook_env, 3)


def progress_chunks(
    items: Sequence[Any], progress: Any, seconds: float = 0.5, max_size: int = 4096
) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items``; ``progress.update`` is called after each one is consumed.

    Iterating the items through tqdm itself costs as much per item as a trivial
    ``forward``. Slices start at one item (slow items still show progress
    one by one) and double, up to ``max_size``, while one takes under ``seconds / 2``;
    they halve when one takes over ``seconds``.
    """
    start, size = 0, 1
    while start < len(items):
        chunk = items[start : start + size]
        began = time.perf_counter()
        yield chunk
        elapsed = time.perf_counter() - began
        progress.update(len(chunk))
        start += len(chunk)
        if elapsed < seconds / 2:
            size = min(2 * size, max_size)
        elif elapsed > seconds:
            size = max(1, size // 2)


def writers_resumable(runner_cls: type) -> bool:
    """Whether a shard of ``runner_cls`` may resume mid-way.

    True where the nearest class of the MRO that sets :data:`RESUMABLE` sets it true
    and none of :data:`WRITER_HOOKS` is overridden below that class.
    """
    owner = next((klass for klass in runner_cls.__mro__ if RESUMABLE in vars(klass)), None)
    if owner is None or vars(owner)[RESUMABLE] is not True:
        return False
    return all(inspect.getattr_static(runner_cls, hook, None) is inspect.getattr_static(owner, hook, None)
               for hook in WRITER_HOOKS)


def resume_state(runner_cls: type, journal: Journal, committed: Optional[Committed], state: Any) -> Tuple[Any, int]:
    """Bring the freshly initialised shard to its last commit: ``(state, first item to run)``.

    The writers' files are cut to their committed lengths (to zero on a fresh start:
    append-mode files of an earlier run). A journal that does not match the files
    (other files, one shorter than committed) is ignored: the shard restarts.
    """
    if not journal.enabled:
        return state, 0
    writers = state.get("_writers") if isinstance(state, dict) else None
    handles = []
    if writers is not None:
        if committed is not None:
            runner_cls.reopen_writers(writers, list(committed.files))
        handles = list(runner_cls.journal_files(writers))
    names = [file_name(handle, journal.shard_dir) for handle in handles]
    if committed is not None:
        sizes = dict(zip(names, file_sizes(handles)))
        if sorted(names) == sorted(committed.files) and all(sizes[n] >= committed.files[n] for n in names):
            truncate_files(handles, [committed.files[n] for n in names])
            journal.resumed(committed)
            state = restored_state(committed, state, journal.shard_dir, journal.records)
            journal.n_records = len(state["records"]) if journal.records else 0
            logger.info("%s: resuming at item %d (the journal's last commit)", journal.shard_dir, committed.n_done)
            return state, committed.n_done
        logger.warning("%s: the journal does not match the shard's files (%s): restarting", journal.shard_dir, names)
    truncate_files(handles, [0] * len(handles))
    return state, 0


@contextmanager
def sigterm_stops(enabled: bool) -> Iterator[List[int]]:
    """While active, SIGTERM is only noted (in the yielded list) for the shard loop to stop at."""
    received: List[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def shard_chunks(
    items: Sequence[Any],
    start: int,
    progress: Any,
    journal: Journal,
    attempt: Attempt,
    stop: List[int],
    state: Callable[[], Any],
) -> Iterator[Sequence[Any]]:
    """:func:`progress_chunks` of ``items[start:]``; after each, note the attempt's progress and
    commit when due, or commit and raise :class:`ShardInterrupted` once a signal was noted in
    ``stop`` (unless the shard is through)."""
    n_done = start
    for chunk in progress_chunks(items[start:], progress, max_size=journal.max_chunk):
        yield chunk
        n_done += len(chunk)
        attempt.progress(n_done)
        if stop and n_done < len(items):
            journal.commit(n_done, state())
            kept = f"committed {journal.n_committed} of {len(items)} items" if journal.enabled else (
                "its writers cannot resume, so a rerun restarts it")
            raise ShardInterrupted(f"stopped by signal {stop[0]} ({kept}); rerun it to continue", stop[0])
        if journal.due(n_done):
            journal.commit(n_done, state())


def run_shard(
    runner_cls: type,
    plan: ShardPlan,
    shard_id: int,
    provider_env: Dict[str, Any],
    provider_name: Optional[str] = None,
    resume: bool = True,
    stop_on_sigterm: bool = False,
    log: Optional[str] = None,
    started: Optional[float] = None,
) -> Dict[str, Any]:
    """Process one shard end to end and return its finalized state.

    Any earlier ``done`` is removed first, so a shard that dies part-way leaves
    none; ``done`` (holding the plan's fingerprint) is written last, atomically.
    With ``resume``, a journal of the same plan makes it continue at its last
    commit (see :func:`resume_state`). With ``stop_on_sigterm`` (the CLI), SIGTERM
    makes it stop after the current slice of items, commit, and raise
    :class:`ShardInterrupted`. An exception on the way gets a note naming the
    shard and the item (or hook) it failed in, which the CLI puts in its one-line error.
    Each call is an attempt in ``split.N/attempts.json`` (:mod:`espnet3_rules.engine.attempts`),
    with the shard's ``log`` file where it has one, begun at ``started`` (default: now).
    """
    env = shard_env(plan.job, provider_env)
    check_forward_env(runner_cls, env, provider_name)
    shard_dir = plan.shard_dir(shard_id)
    shard_dir.mkdir(parents=True, exist_ok=True)
    done_path(shard_dir).unlink(missing_ok=True)

    items = plan.shards[shard_id]
    resumable = writers_resumable(runner_cls)
    committed = read_journal(shard_dir, plan.fingerprint, len(items)) if resume and resumable else None
    if committed is None:
        discard_journal(shard_dir)
    attempt = Attempt(shard_dir, plan.fingerprint, len(items), log, started)
    progress = tqdm(
        total=len(items),
        desc=f"{plan.job.name} shard {shard_id}",
        unit="batch" if plan.job.batch_size else "item",
        mininterval=1.0,
        disable=None if sys.stderr.isatty() else False,
        file=sys.stderr,
    )
    stage, item = "init_state", None
    try:
        with sigterm_stops(stop_on_sigterm) as stop:
            state = runner_cls.init_state(shard_id=shard_id, **env)
            forward, forward_env = runner_cls.forward, env_kwargs(runner_cls.forward, env, 1)
            how, hook, hook_env = record_folder(runner_cls, shard_id, env)
            journal = Journal(shard_dir, plan.fingerprint, getattr(runner_cls, "journal_files", None),
                              records=how == "append", enabled=resumable)
            state, start = resume_state(runner_cls, journal, committed, state)
            attempt.resumed_at(start)
            progress.update(start)
            chunks = shard_chunks(items, start, progress, journal, attempt, stop, lambda: state)
            stage = "forward"
            if how == "append":
                append = state["records"].append
                for chunk in chunks:
                    for item in chunk:
                        append(forward(item, **forward_env))
            elif how == "write":
                writers = state["_writers"]
                for chunk in chunks:
                    for item in chunk:
                        hook(writers, forward(item, **forward_env), state, **hook_env)
            else:
                for chunk in chunks:
                    for item in chunk:
                        state = hook(state, forward(item, **forward_env), **hook_env)
        stage = "finalize_state"
        state = runner_cls.finalize_state(state, shard_id=shard_id, **env)
        stage = "save_state"
        save_state(state, shard_dir)
    except BaseException as exc:
        if isinstance(exc, Exception):
            exc.add_note(f"{shard_dir} item {item!r}" if stage == "forward" else f"{shard_dir} ({stage})")
        attempt.end("interrupted" if isinstance(exc, (ShardInterrupted, KeyboardInterrupt)) else "failed", exc)
        raise
    finally:
        progress.close()
    discard_journal(shard_dir)
    attempt.end("done")
    write_json_atomic(
        done_path(shard_dir),
        {"fingerprint": plan.fingerprint, "shard_id": shard_id, "n_items": len(items), "pid": os.getpid()},
    )
    return state
