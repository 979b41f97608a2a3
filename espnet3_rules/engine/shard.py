"""Run one shard: build env, forward over its items, stream writer hooks, atomic ``done``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

from tqdm import tqdm

from espnet3_rules.engine.contracts import check_env, check_forward_env, check_setup_fn, env_kwargs
from espnet3_rules.engine.plan import ShardPlan, write_json_atomic

DONE_NAME = "done"


def build_local_env(runner: Any) -> Dict[str, Any]:
    """Env for in-process runs: ``provider.build_env_local()``."""
    return check_env(runner.provider, runner.provider.build_env_local())


def build_worker_env(runner: Any) -> Dict[str, Any]:
    """Env for a shard process: ``provider.build_worker_setup_fn()()``, checked on the way."""
    provider = runner.provider
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
    record = read_done(plan.shard_dir(shard_id))
    return record is not None and record.get("fingerprint") == plan.fingerprint


def progress_chunks(
    items: Sequence[Any], progress: Any, seconds: float = 0.5, max_size: int = 4096
) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items``; ``progress.update`` is called after each one is consumed.

    Iterating the items through tqdm itself costs ~0.25 us per item, as much as a
    trivial ``forward``. Slices start at one item (slow items still show progress
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


def run_shard(runner: Any, plan: ShardPlan, shard_id: int, env: Dict[str, Any]) -> Dict[str, Any]:
    """Process one shard end to end and return its finalized state.

    Any earlier ``done`` is removed first, so a shard that dies part-way leaves
    none; ``done`` (holding the plan's fingerprint) is written last, atomically.
    An exception on the way gets a note naming the shard and the item (or hook)
    it failed in, which the CLI puts in its one-line error.
    """
    runner_cls = type(runner)
    env = runner.runtime_env(env)
    check_forward_env(runner_cls, env, type(runner.provider).__name__)
    shard_dir = plan.shard_dir(shard_id)
    shard_dir.mkdir(parents=True, exist_ok=True)
    done_path(shard_dir).unlink(missing_ok=True)

    items = plan.shards[shard_id]
    progress = tqdm(
        total=len(items),
        desc=f"{plan.shard_subdir or plan.output_dir.name} shard {shard_id}",
        unit="batch" if plan.spec.get("batch_size") else "item",
        mininterval=1.0,
        disable=None if sys.stderr.isatty() else False,
        file=sys.stderr,
    )
    stage, item = "open_writers", None
    try:
        state = runner_cls.init_state(shard_id=shard_id, **env)
        forward, forward_env = runner_cls.forward, env_kwargs(runner_cls.forward, env, 1)
        how, hook, hook_env = runner_cls.record_hook(shard_id, env)
        stage = "forward"
        if how == "append":
            append = state["records"].append
            for chunk in progress_chunks(items, progress):
                for item in chunk:
                    append(forward(item, **forward_env))
        elif how == "write":
            writers = state["_writers"]
            for chunk in progress_chunks(items, progress):
                for item in chunk:
                    hook(writers, forward(item, **forward_env), state, **hook_env)
        else:
            for chunk in progress_chunks(items, progress):
                for item in chunk:
                    state = hook(state, forward(item, **forward_env), **hook_env)
        stage = "close_writers"
        state = runner_cls.finalize_state(state, shard_id=shard_id, **env)
        stage = "serialize_state"
        runner_cls.serialize_state(state, shard_dir)
    except Exception as exc:
        exc.add_note(f"{shard_dir} item {item!r}" if stage == "forward" else f"{shard_dir} ({stage})")
        raise
    finally:
        progress.close()
    write_json_atomic(
        done_path(shard_dir),
        {"fingerprint": plan.fingerprint, "shard_id": shard_id, "n_items": len(items), "pid": os.getpid()},
    )
    return state
