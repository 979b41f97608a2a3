"""BaseRunner: a static ``forward`` over sharded items, writer hooks, resume, merge.

At ESPnet3's path (``espnet3.parallel.base_runner``): an ESPnet3 runner subclass
works here by changing only its import line. ``runner(indices)`` runs in-process
through the same engine (plan, run one shard, merge) that the Snakemake rules call.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from espnet3_rules.engine.contracts import (
    ContractError,
    check_env,
    check_forward_env,
    check_runner_class,
    class_path,
    env_kwargs,
)
from espnet3_rules.engine.files import concatenate_shard_files
from espnet3_rules.engine.job import JobSpec, declared_env_keys, shard_root
from espnet3_rules.engine.merge import merge_plan, pending_shards
from espnet3_rules.engine.plan import jsonable, make_plan, write_manifest
from espnet3_rules.engine.shard import load_state, run_shard, standard_hook

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

    Every constructor option of a subclass is recorded as it was passed (no
    override needed): it enters the plan's fingerprint, a shard or merge process
    constructs the runner with it again, and the hooks see it as an env default.

    Args:
        provider: Builds the env (dataset, model, ...).
        batch_size: If set, ``forward`` receives lists of this many indices.
        output_dir: Root of shard outputs (required; ``""`` counts as missing).
        shard_subdir: Sub-path of ``output_dir`` for ``manifest.json`` and ``split.N/``.
        resume: Skip shards whose ``done`` matches the current plan.
        n_shards: Shards the items are split into by ``runner(indices)`` (ESPnet3 takes
            this from the parallel config's ``n_workers``; the Snakemake workflow from the config).
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
        writers = state.pop("_writers", {})
        meta = cls.close_writers(writers, **env_kwargs(cls.close_writers, {"state": state, **env}, 1))
        if meta:
            state.update(meta)
        return state

    # ------------------------------------------------------------ Python API
    def job_spec(self) -> JobSpec:
        """The job description of this runner, recorded from the live objects."""
        if self.output_dir is None:
            raise ContractError(f"{type(self).__name__} needs output_dir: shards write split.N/ under it")
        provider = self.provider
        return JobSpec(
            name=type(self).__name__,
            runner=class_path(type(self)),
            provider=class_path(type(provider)),
            output_dir=str(self.output_dir),
            shard_subdir=self.shard_subdir,
            n_shards=self.n_shards,
            batch_size=self.batch_size,
            # as given: an InferenceProvider merges its params into its config
            provider_config=getattr(provider, "_given_config", None) or jsonable(getattr(provider, "config", None) or {}),
            params=jsonable(getattr(provider, "params", None) or {}),
            runner_kwargs=dict(self._options),
        )

    def __call__(self, indices: Iterable[Any]) -> Any:
        """Plan, run the pending shards in-process (env built once), merge.

        Args:
            indices: The dataset indices to process.

        Returns:
            What ``merge`` returns.
        """
        job = self.job_spec()
        provider_name = type(self.provider).__name__
        check_runner_class(type(self))
        keys = declared_env_keys(job, type(self.provider))
        if keys is not None:
            check_forward_env(type(self), keys, provider_name)
        plan = make_plan(job, list(indices))
        write_manifest(plan)
        pending = pending_shards(plan) if self.resume else list(range(plan.n_shards))
        if pending:
            env = check_env(self.provider, self.provider.build_env_local())
            for shard_id in pending:
                run_shard(type(self), plan, shard_id, env, provider_name)
        return merge_plan(self, plan)
