"""Merge on the driver: ``runner.merge`` over shards whose ``done`` matches the current plan."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List

from espnet3_rules.engine.contracts import ContractFileNotFoundError
from espnet3_rules.engine.files import write_json_atomic
from espnet3_rules.engine.plan import ShardPlan, jsonable
from espnet3_rules.engine.shard import done_path, is_shard_done, read_done

MERGE_DONE_NAME = "merge.done"
REJECTED_DONE_NAME = "done.rejected"


def pending_shards(plan: ShardPlan) -> List[int]:
    """Shard ids without a ``done`` from this plan (missing, torn, or from another plan)."""
    return [shard_id for shard_id in range(plan.n_shards) if not is_shard_done(plan, shard_id)]


def completed_shard_dirs(plan: ShardPlan, set_aside: bool = False) -> List[Path]:
    """All shard dirs in shard-id order; a clear error lists missing, torn and stale shards
    (a ``FileNotFoundError``, as ESPnet3's for a shard that is not complete).

    With ``set_aside``, an untrusted ``done`` (torn, or from another plan) is renamed to
    ``done.rejected``: Snakemake, which only sees that ``done`` exists, then reruns that shard.
    """
    missing, torn, stale = [], [], []
    for shard_id, shard_dir in enumerate(plan.shard_dirs()):
        record = read_done(shard_dir)
        if record is None:
            (torn if done_path(shard_dir).exists() else missing).append(shard_id)
        elif record.get("fingerprint") != plan.fingerprint:
            stale.append(shard_id)
    if not (missing or torn or stale):
        return plan.shard_dirs()
    parts = [
        f"{label}: {', '.join(f'split.{i}' for i in ids)}"
        for label, ids in (("not done", missing), ("torn done", torn), ("stale (done from another plan)", stale))
        if ids
    ]
    advice = "run those shards first"
    if set_aside and (torn or stale):
        for shard_id in torn + stale:
            shard_dir = plan.shard_dir(shard_id)
            os.replace(done_path(shard_dir), shard_dir / REJECTED_DONE_NAME)
        advice += f" (untrusted done renamed to {REJECTED_DONE_NAME}, so the next snakemake run redoes them)"
    raise ContractFileNotFoundError(f"cannot merge {plan.root}: shards {'; '.join(parts)}; {advice}")


def merge_plan(runner: Any, plan: ShardPlan) -> Any:
    """Call ``runner.merge`` on the completed shards and write ``merge.done`` last.

    An earlier ``merge.done`` is removed first, so a merge that dies part-way leaves none.
    """
    merge_done = plan.root / MERGE_DONE_NAME
    merge_done.unlink(missing_ok=True)
    result = runner.merge(completed_shard_dirs(plan, set_aside=True))
    write_json_atomic(
        merge_done,
        {"fingerprint": plan.fingerprint, "n_shards": plan.n_shards, "result": _result_summary(result)},
    )
    return result


def _result_summary(result: Any, limit: int = 100_000) -> Any:
    """``merge``'s return value as JSON when small; its type and length otherwise."""
    data = jsonable(result)
    if len(json.dumps(data, ensure_ascii=False)) <= limit:
        return data
    return {"type": type(result).__name__, "len": len(result) if hasattr(result, "__len__") else None}
