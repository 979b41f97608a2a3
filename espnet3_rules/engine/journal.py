"""The shard journal: what a running shard has committed, so that a rerun after a kill continues there.

While a shard runs, :class:`Journal` commits every ``ESPNET3_RULES_JOURNAL_SECONDS``
(default 5; never more often than 20 times the last commit took) or, if set,
every ``ESPNET3_RULES_JOURNAL_ITEMS`` items (batches with ``batch_size``):

- each shard-local output file the runner's writers append to, flushed and
  fsynced, with its length (which holds exactly the finished items);
- the shard state without its ``_writers`` (pickled), and for the standard hooks'
  ``state["records"]`` the length of ``_journal_records.pkl``, to which each
  commit appends the new records as one pickle;
- all of it in ``split.N/_journal.pkl``, written atomically and fsynced (file and dir).

:func:`read_journal` returns the last commit only for the plan's fingerprint:
a changed plan never resumes. The journal is removed before ``done`` is written.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence

from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.engine.files import atomic_path

JOURNAL_NAME = "_journal.pkl"
RECORDS_NAME = "_journal_records.pkl"
SECONDS_ENV = "ESPNET3_RULES_JOURNAL_SECONDS"
ITEMS_ENV = "ESPNET3_RULES_JOURNAL_ITEMS"
#: A commit waits at least this many times as long as the last one took (commits stay under ~5 % of the run).
COST_FACTOR = 20

logger = logging.getLogger(__name__)


@dataclass
class Committed:
    """The last commit of a shard: items finished, file lengths, state, records file length."""

    n_done: int
    files: Dict[str, int]
    state: Any = None
    records_length: int = 0


def cadence() -> "tuple[float, int]":
    """``(seconds, items)`` between commits from the environment (``items`` 0: by time only)."""
    try:
        seconds = float(os.environ.get(SECONDS_ENV) or 5.0)
        items = int(os.environ.get(ITEMS_ENV) or 0)
    except ValueError as exc:
        raise ContractError(f"{SECONDS_ENV} must be a number and {ITEMS_ENV} an integer ({exc})") from None
    return seconds, max(items, 0)


def read_journal(shard_dir: Path, fingerprint: str, n_items: int) -> Optional[Committed]:
    """The shard's last commit for this fingerprint, or ``None`` (absent, unreadable, another plan)."""
    try:
        data = pickle.loads((Path(shard_dir) / JOURNAL_NAME).read_bytes())
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a journal that cannot be read is no journal
        logger.warning("%s: ignoring an unreadable journal (%s); the shard restarts", shard_dir, exc)
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint or not 0 < data.get("n_done", 0) < n_items:
        return None
    return Committed(data["n_done"], dict(data["files"]), data["state"], data["records_length"])


def discard_journal(shard_dir: Path) -> None:
    """Remove the journal and its records file."""
    for name in (JOURNAL_NAME, RECORDS_NAME):
        (Path(shard_dir) / name).unlink(missing_ok=True)


def read_records(shard_dir: Path, length: int) -> List[Any]:
    """The records of the first ``length`` bytes of ``_journal_records.pkl`` (file truncated to them)."""
    path = Path(shard_dir) / RECORDS_NAME
    records: List[Any] = []
    with path.open("rb+") as f:
        f.truncate(length)
        while f.tell() < length:
            records.extend(pickle.load(f))
    return records


def file_name(handle: Any, shard_dir: Path) -> str:
    """A journaled file's path relative to ``shard_dir`` (it must lie below it)."""
    path = Path(os.path.abspath(handle.name))
    try:
        return path.relative_to(os.path.abspath(shard_dir)).as_posix()
    except ValueError:
        raise ContractError(f"writer file {path} is not under its shard dir {shard_dir}: it cannot be resumed") from None


def truncate_files(handles: Sequence[IO], lengths: Sequence[int]) -> None:
    """Cut each open file to its length (writes after that append: the files are in append mode)."""
    for handle, length in zip(handles, lengths):
        handle.flush()
        os.ftruncate(handle.fileno(), length)
        handle.seek(0, os.SEEK_END)


def file_sizes(handles: Sequence[IO]) -> List[int]:
    """The size of each open file (flushed first)."""
    sizes = []
    for handle in handles:
        handle.flush()
        sizes.append(os.fstat(handle.fileno()).st_size)
    return sizes


@dataclass
class Journal:
    """Commits a running shard's progress to ``split.N/_journal.pkl``.

    Args:
        shard_dir: The shard's directory.
        fingerprint: The plan's fingerprint.
        files: ``files(writers_state)`` -> the open files to journal (the runner's ``journal_files``).
        records: Whether ``state["records"]`` is the standard hooks' list (journaled by appending).
        enabled: False where the runner's writers cannot resume: nothing is committed.
    """

    shard_dir: Path
    fingerprint: str
    files: Any
    records: bool
    enabled: bool = True
    seconds: float = 5.0
    items: int = 0
    n_committed: int = 0
    records_length: int = 0
    n_records: int = 0
    next_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.seconds, self.items = cadence()
        self.next_at = time.monotonic() + self.seconds

    @property
    def max_chunk(self) -> int:
        """The largest slice of items between two looks at the journal."""
        return self.items or 4096

    def due(self, n_done: int) -> bool:
        """Whether a commit is due after ``n_done`` items."""
        if not self.enabled:
            return False
        if self.items and n_done - self.n_committed >= self.items:
            return True
        return time.monotonic() >= self.next_at

    def resumed(self, committed: Committed) -> None:
        """Continue counting from a restored commit."""
        self.n_committed, self.records_length = committed.n_done, committed.records_length

    def commit(self, n_done: int, state: Any) -> None:
        """Make the first ``n_done`` items durable: files fsynced, records appended, the journal renamed in."""
        if not self.enabled or n_done == self.n_committed:
            return
        began = time.monotonic()
        writers = state.get("_writers") if isinstance(state, dict) else None
        handles = list(self.files(writers)) if writers is not None else []
        lengths = file_sizes(handles)
        for handle in handles:
            os.fsync(handle.fileno())
        try:
            data = {
                "fingerprint": self.fingerprint,
                "n_done": n_done,
                "files": {file_name(h, self.shard_dir): n for h, n in zip(handles, lengths)},
                "state": pickle.dumps(self.state_view(state), protocol=pickle.HIGHEST_PROTOCOL),
                "records_length": self.append_records(state) if self.records else 0,
            }
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            logger.warning("%s: the shard state cannot be pickled (%s): no journal, a rerun restarts", self.shard_dir, exc)
            self.enabled = False
            discard_journal(self.shard_dir)
            return
        with atomic_path(self.shard_dir / JOURNAL_NAME, durable=True) as tmp:
            tmp.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
        self.n_committed = n_done
        self.next_at = time.monotonic() + max(self.seconds, COST_FACTOR * (time.monotonic() - began))

    def state_view(self, state: Any) -> Any:
        """The state as journaled: ``_writers`` (and ``records`` where those go to their own file) as None,
        so that the restored state keeps the keys' order."""
        if not isinstance(state, dict):
            return state
        dropped = ("_writers", "records") if self.records else ("_writers",)
        return {key: None if key in dropped else value for key, value in state.items()}

    def append_records(self, state: Dict[str, Any]) -> int:
        """Append the records since the last commit to ``_journal_records.pkl``; its new length."""
        records = state["records"]
        with (self.shard_dir / RECORDS_NAME).open("ab") as f:
            f.truncate(self.records_length)  # bytes past the last commit belong to a commit never made
            pickle.dump(records[self.n_records :], f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
            length = f.tell()
        self.n_records, self.records_length = len(records), length
        return length


def restored_state(committed: Committed, fresh: Any, shard_dir: Path, records: bool) -> Any:
    """The state of a commit, with the fresh state's ``_writers`` (and the records read back)."""
    state = pickle.loads(committed.state)
    if not isinstance(state, dict):
        return state
    if "_writers" in state:
        state["_writers"] = fresh["_writers"]
    if records:
        state["records"] = read_records(shard_dir, committed.records_length)
    return state
