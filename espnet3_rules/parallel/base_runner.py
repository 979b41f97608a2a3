"""BaseRunner: static ``forward`` over sharded items, writer hooks, resume, merge.

Mirrors ``espnet3.parallel.base_runner.BaseRunner``: an ESPnet3 runner subclass
works here by changing only its import line. ``runner(indices)`` runs in-process
through the same plan / run-shard / merge engine that the Snakemake rules call.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from espnet3_rules.engine.contracts import ContractError, check_forward_env, check_runner_class, class_path, env_kwargs
from espnet3_rules.engine.plan import ShardPlan, jsonable, make_plan, write_manifest

STATE_NAME = "_state.pkl"


#: Errors with which the kernel refuses ``copy_file_range`` between two files (the copy then
#: goes through Python buffers): no such call, across file systems, not for this file system
#: or file, blocked by a seccomp filter.
_COPY_RANGE_REFUSED = frozenset(
    {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM}
)
COPY_BLOCK = 1 << 20


def append_file(path: Path, out: BinaryIO) -> None:
    """Append the bytes of ``path`` to the binary file ``out`` (opened for writing).

    The kernel copies them (``os.copy_file_range``: no trip through Python) where it
    can; where it refuses (see ``_COPY_RANGE_REFUSED``) or stops short, the rest is
    copied with ``shutil.copyfileobj`` from the offset reached.
    """
    with Path(path).open("rb") as src:
        size = os.fstat(src.fileno()).st_size
        copied = 0
        copy_range = getattr(os, "copy_file_range", None)
        if copy_range is not None and size:
            out.flush()  # the kernel appends at the file offset: nothing may wait in out's buffer
            try:
                while copied < size:
                    n = copy_range(src.fileno(), out.fileno(), size - copied, copied)
                    if n == 0:
                        break
                    copied += n
            except OSError as exc:
                if exc.errno not in _COPY_RANGE_REFUSED:
                    raise
        if copied < size:
            src.seek(copied)
            shutil.copyfileobj(src, out, COPY_BLOCK)
            out.flush()


def concatenate_to_temp(fragments: Sequence[Path], out_path: Path, stop: Optional[Callable[[], bool]] = None) -> Path:
    """Write ``fragments`` concatenated to a temp file beside ``out_path`` and return its path.

    The caller renames it onto ``out_path`` (``os.replace``). The temp file is
    removed if copying fails, or if ``stop()`` turns true between fragments (then
    :class:`InterruptedError` is raised).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.{os.getpid()}")
    try:
        with tmp.open("wb") as out:
            for fragment in fragments:
                if stop is not None and stop():
                    raise InterruptedError(f"concatenation into {out_path} stopped")
                append_file(fragment, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def concatenate_shard_files(shard_dirs: Sequence[Path], relative_name: str, out_path: Path) -> bool:
    """Concatenate ``<shard_dir>/<relative_name>`` across ``shard_dirs`` (in the given order).

    The output is written to a temp file and renamed, so a killed merge never
    leaves a half-written ``out_path``. The data are not fsynced (as ``cat``,
    Snakemake and Kaldi do not, and as the shards' own outputs are not): a killed
    process loses nothing that reached the page cache; only a power loss or kernel
    crash soon after the merge can leave ``out_path`` short, and then the merge
    must be rerun. Returns ``False`` (and removes ``out_path``) if no shard has the
    fragment.
    """
    out_path = Path(out_path)
    fragments = [Path(d) / relative_name for d in shard_dirs]
    fragments = [f for f in fragments if f.exists()]
    if not fragments:
        out_path.unlink(missing_ok=True)
        return False
    os.replace(concatenate_to_temp(fragments, out_path), out_path)
    return True


class BaseRunner(ABC):
    """Run a static ``forward`` over items in shards, with resumable shard outputs.

    Subclass contract (as in ESPnet3):

    - ``@staticmethod forward(idx, dataset, model, **env)``: env keys are injected
      by name; with ``batch_size`` set, ``idx`` is a list of indices.
    - Writer hooks ``open_writers`` / ``write_record`` / ``close_writers`` stream
      results into shard-local files under ``split.N/``.
    - ``merge(shard_dirs)`` combines completed shards on the driver.

    Args:
        provider: Builds the env (dataset, model, ...).
        batch_size: If set, ``forward`` receives lists of this many indices.
        output_dir: Root of shard outputs (required; ``""`` counts as missing).
        shard_subdir: Sub-path of ``output_dir`` for ``manifest.json`` and ``split.N/``.
        resume: Skip shards whose ``done`` matches the current plan.
        n_shards: Shards the items are split into (the Snakemake workflow runs
            each as its own job; ``runner(indices)`` runs them in-process).
    """

    def __init__(
        self,
        provider: Any,
        batch_size: Optional[int] = None,
        output_dir: Any = None,
        shard_subdir: str = "",
        resume: bool = True,
        n_shards: int = 1,
    ):
        """Keep the provider and the shard layout settings."""
        self.provider = provider
        self.batch_size = batch_size
        # An empty string is no directory (Path("") would silently mean the cwd).
        self.output_dir = Path(output_dir) if output_dir not in (None, "") else None
        self.shard_subdir = shard_subdir or ""
        self.resume = resume
        self.n_shards = n_shards

    # ------------------------------------------------------------------ hooks
    @staticmethod
    @abstractmethod
    def forward(idx: Any, dataset: Any = None, model: Any = None, **env: Any) -> Any:
        """Compute the result for one index (or one batch of indices)."""
        raise NotImplementedError

    @staticmethod
    def open_writers(shard_dir: Optional[Path], **env: Any) -> Dict[str, Any]:
        """Open per-shard writers (called once per shard, before any ``forward``)."""
        return {}

    @staticmethod
    def write_record(writers: Dict[str, Any], result: Any, state: Dict[str, Any], **env: Any) -> None:
        """Persist one ``forward`` result; the default appends it to ``state["records"]``."""
        state.setdefault("records", []).append(result)

    @staticmethod
    def close_writers(writers: Dict[str, Any], state: Optional[Dict[str, Any]] = None, **env: Any) -> Optional[Dict[str, Any]]:
        """Close per-shard writers; a returned dict is merged into the shard state.

        Overrides may take ``(writers)`` alone or ``(writers, state, **env)``.
        """
        for writer in writers.values():
            close = getattr(writer, "close", None)
            if callable(close):
                close()
        return None

    def merge(self, shard_dirs: List[Path]) -> Any:
        """Combine completed shards (in shard-id order) on the driver.

        The default returns every shard's ``state["records"]`` concatenated, which
        is what a state-accumulating runner (no writer hooks) needs.
        """
        records: List[Any] = []
        for shard_dir in shard_dirs:
            records.extend(self.deserialize_state(shard_dir).get("records") or [])
        return records

    def runtime_env(self, env: Dict[str, Any]) -> Dict[str, Any]:
        """Env entries the runner adds to the provider's (``output_dir``, ``shard_subdir``).

        Subclasses extend this to expose their options to the static hooks.
        """
        env = dict(env)
        if self.output_dir is not None:
            env.setdefault("output_dir", str(self.output_dir))
        env.setdefault("shard_subdir", self.shard_subdir)
        return env

    def runner_kwargs(self) -> Dict[str, Any]:
        """Constructor keyword arguments beyond BaseRunner's, recorded in the plan.

        A shard process rebuilds the runner from ``manifest.json`` with these.
        """
        return {}

    # ------------------------------------------------------ lower-level state
    @classmethod
    def init_state(cls, shard_id: int = 0, output_dir: Any = "", shard_subdir: str = "", **env: Any) -> Dict[str, Any]:
        """Create ``split.N/``, open writers, and return the initial shard state."""
        root = Path(output_dir) / shard_subdir if shard_subdir else Path(output_dir)
        shard_dir = root / f"split.{shard_id}"
        shard_dir.mkdir(parents=True, exist_ok=True)
        hook_env = {"shard_id": shard_id, "output_dir": output_dir, "shard_subdir": shard_subdir, **env}
        writers = cls.open_writers(shard_dir, **env_kwargs(cls.open_writers, hook_env, 1))
        return {"shard_id": shard_id, "shard_dir": str(shard_dir), "_writers": writers, "records": []}

    @classmethod
    def reduce_state(cls, state: Dict[str, Any], result: Any, **env: Any) -> Dict[str, Any]:
        """Fold one ``forward`` result into the state through ``write_record``."""
        cls.write_record(state["_writers"], result, state, **env_kwargs(cls.write_record, env, 3))
        return state

    @classmethod
    def finalize_state(cls, state: Dict[str, Any], **env: Any) -> Dict[str, Any]:
        """Close writers and merge what ``close_writers`` returned into the state."""
        writers = state.pop("_writers", {})
        meta = cls.close_writers(writers, **env_kwargs(cls.close_writers, {"state": state, **env}, 1))
        if meta:
            state.update(meta)
        return state

    @staticmethod
    def serialize_state(state: Dict[str, Any], shard_dir: Path) -> Path:
        """Persist a finalized shard state as ``split.N/_state.pkl`` (atomically)."""
        path = Path(shard_dir) / STATE_NAME
        tmp = path.with_name(f".{STATE_NAME}.tmp.{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            tmp.unlink(missing_ok=True)
            raise ContractError(
                f"shard state of {shard_dir} cannot be pickled ({exc}); return picklable values "
                "from forward/close_writers or stream results to files with writer hooks"
            ) from exc
        os.replace(tmp, path)
        return path

    @staticmethod
    def deserialize_state(shard_dir: Path) -> Dict[str, Any]:
        """Read a shard state written by :meth:`serialize_state`."""
        with (Path(shard_dir) / STATE_NAME).open("rb") as f:
            return pickle.load(f)

    # ----------------------------------------------------- engine plumbing
    @classmethod
    def record_hook(cls, shard_id: int, env: Dict[str, Any]) -> Tuple[str, Optional[Callable[..., Any]], Dict[str, Any]]:
        """How the engine folds each ``forward`` result into the shard state, the env bound once per shard.

        - ``("reduce", reduce_state, env)`` where ``reduce_state`` is overridden:
          ``state = reduce_state(state, result, **env)``;
        - ``("append", None, {})`` for the default hooks: results are appended to
          ``state["records"]`` without a call;
        - ``("write", write_record, kwargs)`` for writer hooks:
          ``write_record(state["_writers"], result, state, **kwargs)``, called by the
          shard loop itself (no wrapper frame per item).
        """
        hook_env = {"shard_id": shard_id, **env}
        if cls.reduce_state.__func__ is not BaseRunner.reduce_state.__func__:
            return "reduce", cls.reduce_state, hook_env
        write_record = cls.write_record
        if write_record is BaseRunner.write_record:
            return "append", None, {}
        return "write", write_record, env_kwargs(write_record, hook_env, 3)

    def plan_spec(self) -> Dict[str, Any]:
        """What determines results besides the items; also rebuilds the runner in a shard process."""
        return {
            "runner": class_path(type(self)),
            "provider": class_path(type(self.provider)),
            "provider_config": jsonable(getattr(self.provider, "config", None)),
            "params": jsonable(getattr(self.provider, "params", None) or {}),
            "batch_size": self.batch_size,
            "runner_kwargs": jsonable(self.runner_kwargs()),
        }

    def validate(self) -> None:
        """Plan-time contract checks that need no env: static forward, env names if declared."""
        check_runner_class(type(self))
        declared = getattr(self.provider, "declared_env_keys", lambda: None)()
        if declared is not None:
            check_forward_env(type(self), self.runtime_env(dict.fromkeys(declared)), type(self.provider).__name__)

    def plan(self, indices: Iterable[Any]) -> ShardPlan:
        """Validate, then split ``indices`` into the shard plan."""
        if self.output_dir is None:
            raise ContractError(f"{type(self).__name__} needs output_dir: shards write split.N/ under it")
        self.validate()
        return make_plan(self.plan_spec(), list(indices), self.n_shards, self.output_dir, self.shard_subdir)

    def __call__(self, indices: Iterable[Any]) -> Any:
        """Plan, run pending shards in-process (env built once), merge; return ``merge``'s value."""
        from espnet3_rules.engine.merge import merge_plan, pending_shards
        from espnet3_rules.engine.shard import build_local_env, run_shard

        plan = self.plan(indices)
        write_manifest(plan)
        pending = pending_shards(plan) if self.resume else list(range(plan.n_shards))
        if pending:
            env = build_local_env(self)
            for shard_id in pending:
                run_shard(self, plan, shard_id, env)
        return merge_plan(self, plan)
