"""Merge on the driver: only shards whose ``done`` matches the current plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List

from .contracts import ContractError
from .plan import ShardPlan, jsonable, write_json_atomic
from .shard import read_done

MERGE_DONE_NAME = "merge.done"


def pending_shards(plan: ShardPlan) -> List[int]:
    """Shard ids without a ``done`` from this plan (missing, torn, or from another plan)."""
    return [
        shard_id
        for shard_id, shard_dir in enumerate(plan.shard_dirs())
        if (read_done(shard_dir) or {}).get("fingerprint") != plan.fingerprint
    ]


def completed_shard_dirs(plan: ShardPlan) -> List[Path]:
    """All shard dirs in shard-id order; a clear error lists missing and stale shards."""
    missing, stale = [], []
    for shard_id, shard_dir in enumerate(plan.shard_dirs()):
        record = read_done(shard_dir)
        if record is None:
            missing.append(shard_id)
        elif record.get("fingerprint") != plan.fingerprint:
            stale.append(shard_id)
    if missing or stale:
        parts = []
        if missing:
            parts.append(f"not done: {_ids(missing)}")
        if stale:
            parts.append(f"stale (done from another plan): {_ids(stale)}")
        raise ContractError(f"cannot merge {plan.root}: shards {'; '.join(parts)}; run those shards first")
    return plan.shard_dirs()


def _ids(ids: List[int]) -> str:
    return ", ".join(f"split.{i}" for i in ids)


def merge_plan(runner: Any, plan: ShardPlan) -> Any:
    """Call ``runner.merge`` on the completed shards and write ``merge.done`` last."""
    result = runner.merge(completed_shard_dirs(plan))
    write_json_atomic(
        plan.root / MERGE_DONE_NAME,
        {"fingerprint": plan.fingerprint, "n_shards": plan.n_shards, "result": _result_summary(result)},
    )
    return result


def _result_summary(result: Any, limit: int = 100_000) -> Any:
    """``merge``'s return value as JSON when small; its type and length otherwise."""
    data = jsonable(result)
    if len(json.dumps(data, ensure_ascii=False)) <= limit:
        return data
    return {"type": type(result).__name__, "len": len(result) if hasattr(result, "__len__") else None}
