"""BaseRunner: a static ``forward`` over sharded items, writer hooks, resume, merge.

At ESPnet3's path (``espnet3.parallel.base_runner``): an ESPnet3 runner subclass
works here by changing only its import line. ``runner(indices)`` runs in-process
through the same engine (plan, run one shard, merge) that the Snakemake rules call.
"""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from espnet3_rules.engine.cluster_options import shard_resources
from espnet3_rules.engine.contracts import (
    ContractError,
    ContractRuntimeError,
    check_env,
    check_forward_env,
    check_runner_class,
    class_path,
    env_kwargs,
)
from espnet3_rules.engine.files import concatenate_shard_files
from espnet3_rules.engine.job import JobSpec, declared_env_keys, shard_root
from espnet3_rules.engine.journal import discard_journal
from espnet3_rules.engine.merge import merge_plan
from espnet3_rules.engine.plan import ShardPlan, check_same_layout, jsonable, make_plan, write_manifest
from espnet3_rules.engine.shard import (
    is_shard_done,
    load_state,
    read_done,
    release_shard_lock,
    run_shard,
    standard_hook,
    take_shard_lock,
)
from espnet3_rules.cli.snakemake_run import check_env_name, check_importable, run_shards
from espnet3_rules.parallel.parallel import allow_overwrite_lock, get_parallel_config, n_workers

__all__ = ["BaseRunner", "concatenate_shard_files"]

#: BaseRunner's own constructor arguments: everything else a subclass is constructed with is a runner option.
BASE_ARGUMENTS = ("batch_size", "output_dir", "shard_subdir", "resume", "n_shards")


def constructor_options(cls: type, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The options a runner was constructed with (beyond the provider and :data:`BASE_ARGUMENTS`),
    as passed: what a shard process would construct it with again."""
    try:
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
    except TypeError:
        return {}  # __init__ itself raises the error
    parameters = inspect.signature(cls.__init__).parameters
    options: Dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[2:]:  # past self and the provider
        kind = parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            options.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            options[name] = value
    return {name: value for name, value in options.items() if name not in BASE_ARGUMENTS}


class BaseRunner(ABC):
    """Run a static (or class) ``forward`` over items in shards, with resumable shard outputs.

    Subclass contract (as in ESPnet3):

    - ``forward(idx, dataset, model, **env)`` as a ``@staticmethod`` or ``@classmethod``:
      env keys are injected by name; with ``batch_size`` set, ``idx`` is a list of indices.
    - Writer hooks ``open_writers`` / ``write_record`` / ``close_writers`` stream
      results into shard-local files under ``split.N/``.
    - ``merge(shard_dirs)`` combines completed shards on the driver.

    A shard commits its progress as it runs; rerun after a kill (same plan), it
    continues at the first uncommitted item: see :attr:`resumable_writers`.

    Every constructor option of a subclass is recorded as it was passed (no
    override needed): it enters the plan's fingerprint, a shard or merge process
    constructs the runner with it again, and the hooks see it as an env default.

    Args:
        provider: Builds the env (dataset, model, ...).
        batch_size: If set, ``forward`` receives lists of this many indices.
        output_dir: Root of shard outputs (required; ``""`` counts as missing).
        shard_subdir: Sub-path of ``output_dir`` for ``manifest.json`` and ``split.N/``.
        resume: Skip shards whose ``done`` matches the current plan; refuse a plan whose
            shards hold other items than the existing ``manifest.json``'s (as ESPnet3).
            ``False``: replan, overwrite the manifest and rerun every shard.
        n_shards: Shards the items are split into by ``runner(indices)``. ``None``: the
            parallel config's ``n_workers`` (:func:`~espnet3_rules.parallel.parallel.set_parallel`;
            at most one shard per item, as ESPnet3), or 1 without one. The Snakemake
            workflow takes it from the job config.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "BaseRunner":
        """Record the constructor options (see :func:`constructor_options`)."""
        runner = super().__new__(cls)
        runner._options = constructor_options(cls, args, kwargs)
        return runner

    def __init__(
        self,
        provider: Any,
        batch_size: Optional[int] = None,
        output_dir: Any = None,
        shard_subdir: str = "",
        resume: bool = True,
        n_shards: Optional[int] = None,
    ):
        """Keep the provider and the shard layout settings."""
        self.provider = provider
        self.batch_size = batch_size
        # An empty string is no directory (Path("") would silently mean the cwd).
        self.output_dir = Path(output_dir) if output_dir not in (None, "") else None
        self.shard_subdir = shard_subdir or ""
        self.resume = resume
        self.n_shards = n_shards

    #: Whether a shard killed part-way may continue where it was (ours; ESPnet3 restarts shards).
    #: The default hooks (results in ``state["records"]``) and InferenceRunner's resume. A
    #: subclass overriding ``open_writers``, ``write_record`` or ``close_writers`` restarts its
    #: shards from item 0 unless it sets this true again, which promises: every open file among
    #: the values of ``open_writers``' dict lies under ``shard_dir``, is opened in append mode
    #: (``"a"``/``"ab"``) and is only appended to, one whole record per ``write_record``; other
    #: files ``write_record`` writes are rewritten whole when an item is computed again. A
    #: rerun then cuts each such file to the length that holds the committed items.
    resumable_writers: bool = True

    # ------------------------------------------------------------------ hooks
    @staticmethod
    @abstractmethod
    def forward(idx: Any, dataset: Any = None, model: Any = None, **env: Any) -> Any:
        """Compute the result for one index or one batch.

        Args:
            idx: A dataset index, or a list of them when ``batch_size`` is set.
            dataset: The env's ``dataset``.
            model: The env's ``model``.
            **env: Other env entries, injected by name.

        Returns:
            The result, handed to ``write_record`` (or ``reduce_state``).
        """
        raise NotImplementedError

    @staticmethod
    def open_writers(shard_dir: Optional[Path], **env: Any) -> Dict[str, Any]:
        """Open per-shard writers (once per shard, before any ``forward``).

        Args:
            shard_dir: The shard's ``split.N/`` directory (created already).
            **env: The env, plus ``shard_id``.

        Returns:
            Writers by name, handed to ``write_record`` and ``close_writers``.
        """
        return {}

    @staticmethod
    @standard_hook("append_to_records")
    def write_record(writers: Dict[str, Any], result: Any, state: Dict[str, Any], **env: Any) -> None:
        """Persist one ``forward`` result; the default appends it to ``state["records"]``.

        Args:
            writers: What ``open_writers`` returned.
            result: One ``forward`` result.
            state: The shard state.
            **env: The env, plus ``shard_id``.
        """
        state.setdefault("records", []).append(result)

    @staticmethod
    def close_writers(
        writers: Dict[str, Any], state: Optional[Dict[str, Any]] = None, **env: Any
    ) -> Optional[Dict[str, Any]]:
        """Close per-shard writers. Overrides may take ``(writers)`` alone or ``(writers, state, **env)``.

        Args:
            writers: What ``open_writers`` returned.
            state: The shard state.
            **env: The env, plus ``shard_id``.

        Returns:
            A dict merged into the shard state, or ``None``.
        """
        for writer in writers.values():
            close = getattr(writer, "close", None)
            if callable(close):
                close()
        return None

    @classmethod
    def journal_files(cls, writers: Dict[str, Any]) -> List[Any]:
        """The open files the shard journal keeps lengths of (see :attr:`resumable_writers`).

        Args:
            writers: What ``open_writers`` returned.

        Returns:
            Every value of ``writers`` that is an open file.

        Raises:
            ValueError: One is not opened in append mode.
        """
        files = [writer for writer in writers.values() if callable(getattr(writer, "fileno", None))]
        for handle in files:
            if "a" not in getattr(handle, "mode", ""):
                raise ContractError(
                    f"{cls.__name__}.resumable_writers is set, so open_writers must open its files in append mode "
                    f"('a'): {handle.name} has mode {getattr(handle, 'mode', None)!r}"
                )
        return files

    @staticmethod
    def reopen_writers(writers: Dict[str, Any], names: List[str]) -> None:
        """On a resumed shard, after ``open_writers``: open the files it opens only on demand.

        Args:
            writers: What ``open_writers`` returned.
            names: The journaled files, relative to ``shard_dir``.
        """

    def merge(self, shard_dirs: List[Path]) -> Any:
        """Combine completed shards on the driver.

        Args:
            shard_dirs: The ``split.N/`` directories, in shard-id order.

        Returns:
            What ``runner(indices)`` returns. The default: every shard's
            ``state["records"]`` concatenated (what a runner without writer hooks needs).
        """
        records: List[Any] = []
        for shard_dir in shard_dirs:
            records.extend(load_state(shard_dir).get("records") or [])
        return records

    # ------------------------------------------------------ lower-level state
    @classmethod
    def init_state(cls, shard_id: int = 0, output_dir: Any = "", shard_subdir: str = "", **env: Any) -> Dict[str, Any]:
        """Create ``split.N/``, open its writers, and return the initial shard state.

        Args:
            shard_id: The shard.
            output_dir: Root of shard outputs.
            shard_subdir: Sub-path of ``output_dir``.
            **env: The env.

        Returns:
            ``{"shard_id", "shard_dir", "_writers", "records"}``.
        """
        shard_dir = shard_root(output_dir, shard_subdir) / f"split.{shard_id}"
        shard_dir.mkdir(parents=True, exist_ok=True)
        hook_env = {"shard_id": shard_id, "output_dir": output_dir, "shard_subdir": shard_subdir, **env}
        writers = cls.open_writers(shard_dir, **env_kwargs(cls.open_writers, hook_env, 1))
        return {"shard_id": shard_id, "shard_dir": str(shard_dir), "_writers": writers, "records": []}

    @classmethod
    @standard_hook("fold_via_write_record")
    def reduce_state(cls, state: Dict[str, Any], result: Any, **env: Any) -> Dict[str, Any]:
        """Fold one ``forward`` result into the state through ``write_record``.

        Args:
            state: The shard state.
            result: One ``forward`` result.
            **env: The env, plus ``shard_id``.

        Returns:
            The state.
        """
        cls.write_record(state["_writers"], result, state, **env_kwargs(cls.write_record, env, 3))
        return state

    @classmethod
    def finalize_state(cls, state: Dict[str, Any], **env: Any) -> Dict[str, Any]:
        """Close the writers and merge what ``close_writers`` returned into the state.

        Args:
            state: The shard state.
            **env: The env, plus ``shard_id``.

        Returns:
            The final state (saved as ``split.N/_state.pkl``).
        """
        close = cls.close_writers
        writers = state.get("_writers", {})
        if takes_positional(close, 2):  # ESPnet3 passes the state positionally
            meta = close(writers, state, **env_kwargs(close, env, 2))
        else:
            meta = close(writers, **env_kwargs(close, {"state": state, **env}, 1))
        if meta:
            state.update(meta)
        state.pop("_writers", None)
        return state

    @classmethod
    def is_shard_done(cls, shard_dir: Any) -> bool:
        """Whether ``shard_dir`` has a completion marker: a readable ``done`` record.

        ``runner(indices)`` and the merge trust a ``done`` only if it was also written
        for the current plan (its fingerprint, :func:`espnet3_rules.engine.shard.is_shard_done`).
        ``runner(indices)`` also asks this method (as ESPnet3 does), so an override may add
        conditions (an output file present, say); it cannot make an untrusted ``done`` count.

        Args:
            shard_dir: A ``split.N/`` directory.

        Returns:
            ``True`` if its ``done`` holds a record, from any plan.
        """
        return read_done(Path(shard_dir)) is not None

    # ------------------------------------------------------------ Python API
    def job_spec(self) -> JobSpec:
        """The job description of this runner, recorded from the live objects."""
        if self.output_dir is None:
            raise ContractRuntimeError(
                f"{type(self).__name__} requires output_dir for shard execution: shards write split.N/ under it"
            )
        provider = self.provider
        return JobSpec(
            name=type(self).__name__,
            runner=class_path(type(self)),
            provider=class_path(type(provider)),
            output_dir=str(self.output_dir),
            shard_subdir=self.shard_subdir,
            n_shards=self.n_shards if self.n_shards is not None else n_workers(),
            batch_size=self.batch_size,
            # as given: an InferenceProvider merges its params into its config
            provider_config=getattr(provider, "_given_config", None) or jsonable(getattr(provider, "config", None) or {}),
            params=jsonable(getattr(provider, "params", None) or {}),
            runner_kwargs=dict(self._options),
        )

    def __call__(self, indices: Iterable[Any]) -> Any:
        """Plan, run the pending shards, merge in this process.

        Each pending shard is locked (``split.N/lock``) before any runs, so a second
        ``runner(indices)`` on the same output dir is refused instead of running it twice;
        see :func:`~espnet3_rules.engine.shard.take_shard_lock`. Without a parallel config
        the shards run one after another in this process (env built once); with one
        (:func:`~espnet3_rules.parallel.parallel.set_parallel`, any ``env``) they run as
        Snakemake jobs of the workflow's ``rule shard``
        (:func:`~espnet3_rules.cli.snakemake_run.run_shards`), ``n_workers`` at once.

        Args:
            indices: The dataset indices to process.

        Returns:
            What ``merge`` returns.

        Raises:
            RuntimeError: No ``output_dir``; ``resume=True`` over a manifest of another shard
                layout; a shard locked by another runner; shards that failed under Snakemake
                (each named with its log; the others finished).
            ValueError: A bad ``batch_size``, ``n_shards`` or index list; a parallel ``env`` or
                ``options`` key not supported here; a runner or provider class defined in ``__main__``.
            TypeError: ``forward`` is not a static or class method.
        """
        job = self.job_spec()
        provider_name = type(self.provider).__name__
        check_runner_class(type(self))
        keys = declared_env_keys(job, type(self.provider))
        if keys is not None:
            check_forward_env(type(self), keys, provider_name)
        parallel = get_parallel_config()
        if parallel is not None:
            job = parallel_job(job, parallel)
        plan = make_plan(job, list(indices), at_most_one_shard_per_item=self.n_shards is None)
        if self.resume:
            check_same_layout(plan)
        write_manifest(plan)
        with ExitStack() as locks:
            pending = self._lock_pending(plan, locks)
            if not self.resume:  # every pending shard starts at item 0, however it is run
                for shard_id, _ in pending:
                    discard_journal(plan.shard_dir(shard_id))
            if pending and parallel is not None:
                run_shards(plan, [shard_id for shard_id, _ in pending], parallel.get("env", "local"), n_workers())
            elif pending:
                env = check_env(self.provider, self.provider.build_env_local())
                for shard_id, held in pending:
                    run_shard(type(self), plan, shard_id, env, provider_name)
                    release_shard_lock(plan.shard_dir(shard_id), held)
        return merge_plan(self, plan)

    def _lock_pending(self, plan: ShardPlan, locks: ExitStack) -> List[Tuple[int, bytes]]:
        """Lock every shard to run (with ``resume``: not done for this plan); ``locks`` releases them.

        A done shard is skipped without locking, and again if another runner finished it
        while this one waited for the lock (as ESPnet3's ``_filter_pending_shards``).
        """
        def done(shard_id: int) -> bool:  # this plan's done, and the class's own is_shard_done (an override counts)
            return is_shard_done(plan, shard_id) and type(self).is_shard_done(plan.shard_dir(shard_id))

        allow_overwrite = allow_overwrite_lock()
        pending = []
        for shard_id, shard_dir in enumerate(plan.shard_dirs()):
            if self.resume and done(shard_id):
                continue
            held = take_shard_lock(shard_dir, allow_overwrite)
            locks.callback(release_shard_lock, shard_dir, held)
            if self.resume and done(shard_id):
                release_shard_lock(shard_dir, held)
                continue
            pending.append((shard_id, held))
        return pending


def parallel_job(job: JobSpec, parallel: Any) -> JobSpec:
    """``job`` as the parallel config runs it: its env checked, its classes importable by a shard
    process, its ``options`` as shard resources (which never change results or the fingerprint)."""
    env = check_env_name(parallel.get("env", "local"))
    check_importable(job)
    return dataclasses.replace(job, resources={**job.resources, **shard_resources(env, parallel.get("options") or {})})


def takes_positional(fn: Callable, n: int) -> bool:
    """Whether ``fn`` accepts ``n`` positional arguments."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in params) >= n
