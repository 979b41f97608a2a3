"""The shard plan of a job: batching, contiguous balanced chunks, fingerprint, ``manifest.json``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from espnet3_rules.engine.contracts import ContractError, ContractRuntimeError, check_setup_fn
from espnet3_rules.engine.files import write_json_atomic
from espnet3_rules.engine.job import JobSpec, build_provider, build_runner, check_classes, count_items

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2


def make_batches(indices: Sequence[Any], batch_size: Optional[int]) -> List[Any]:
    """Group ``indices`` into lists of ``batch_size`` (the last may be shorter)."""
    if batch_size is None:
        return list(indices)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ContractError(f"batch_size must be a positive integer or null, got {batch_size!r}")
    indices = list(indices)
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def split_contiguous(items: Sequence[Any], n_shards: int) -> List[List[Any]]:
    """Split ``items`` into ``n_shards`` contiguous chunks whose sizes differ by at most one.

    The first ``len(items) % n_shards`` chunks get one extra item (ESPnet3's rule).
    """
    quotient, remainder = divmod(len(items), n_shards)
    chunks, start = [], 0
    for shard_id in range(n_shards):
        size = quotient + (1 if shard_id < remainder else 0)
        chunks.append(list(items[start : start + size]))
        start += size
    return chunks


def encode_items(items: Sequence[Any]) -> Any:
    """Compact JSON form of a shard's items: a ``range`` when they are consecutive ints."""
    flat = [i for batch in items for i in batch] if items and isinstance(items[0], list) else list(items)
    consecutive = (
        flat
        and all(type(i) is int for i in flat)
        and flat == list(range(flat[0], flat[0] + len(flat)))
    )
    if not consecutive:
        return list(items)
    encoded: Dict[str, Any] = {"range": [flat[0], flat[0] + len(flat)]}
    if items and isinstance(items[0], list):
        sizes = [len(b) for b in items]
        batch_size = sizes[0]
        if any(s != batch_size for s in sizes[:-1]) or sizes[-1] > batch_size:
            return list(items)
        encoded["batch_size"] = batch_size
    return encoded


def decode_items(encoded: Any) -> List[Any]:
    """Inverse of :func:`encode_items`."""
    if not isinstance(encoded, dict):
        return list(encoded)
    start, stop = encoded["range"]
    flat = list(range(start, stop))
    batch_size = encoded.get("batch_size")
    return make_batches(flat, batch_size) if batch_size else flat


def jsonable(obj: Any) -> Any:
    """Plain-JSON view of configs (OmegaConf, Path, tuples) for manifests and fingerprints."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashing."""
    return json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass
class ShardPlan:
    """What every shard of one job processes, and the fingerprint of what determines results.

    The fingerprint hashes the job's result fields (classes, provider config and
    params, runner options, ``batch_size``) and every shard's items.
    """

    job: JobSpec
    shards: List[List[Any]]
    n_items: int
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fingerprint:
            encoded = [encode_items(items) for items in self.shards]
            self.fingerprint = hashlib.sha256(
                canonical_json({"job": self.job.result_fields(), "shards": encoded}).encode("utf-8")
            ).hexdigest()

    @property
    def n_shards(self) -> int:
        """Number of shards."""
        return len(self.shards)

    @property
    def root(self) -> Path:
        """``output_dir/shard_subdir``: where ``manifest.json`` and ``split.N/`` live."""
        return self.job.root

    @property
    def manifest_path(self) -> Path:
        """Path of ``manifest.json``."""
        return self.root / MANIFEST_NAME

    def shard_dir(self, shard_id: int) -> Path:
        """``split.N`` directory of one shard."""
        if not 0 <= shard_id < self.n_shards:
            raise ContractError(f"shard {shard_id} does not exist; the plan has shards 0..{self.n_shards - 1}")
        return self.root / f"split.{shard_id}"

    def shard_dirs(self) -> List[Path]:
        """All shard directories in shard-id order."""
        return [self.shard_dir(i) for i in range(self.n_shards)]

    def to_manifest(self) -> Dict[str, Any]:
        """The JSON document written to ``manifest.json``: the job description, the items, the fingerprint."""
        return {
            "version": MANIFEST_VERSION,
            "fingerprint": self.fingerprint,
            "job": jsonable(self.job.to_dict()),
            "n_items": self.n_items,
            "n_shards": self.n_shards,
            "shards": [
                {"shard_id": i, "n_items": len(items), "items": encode_items(items)}
                for i, items in enumerate(self.shards)
            ],
        }

    def summary(self) -> str:
        """One line: shards and items per shard."""
        sizes = [len(s) for s in self.shards]
        unit = "batches" if self.job.batch_size else "items"
        per = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
        return f"{self.n_shards} shards x {per} {unit} ({self.n_items} items, batch_size={self.job.batch_size})"


def make_plan(job: JobSpec, indices: Sequence[Any], at_most_one_shard_per_item: bool = False) -> ShardPlan:
    """Batch ``indices`` and split them into ``job.n_shards`` contiguous shards.

    Refuses an empty item list and more shards than items (batches): every shard
    of the plan is a real job with work to do. With ``at_most_one_shard_per_item``
    (``n_shards`` from ESPnet3's ``n_workers``), more shards than items are lowered
    to one per item instead, as ESPnet3 drops its empty shards.
    """
    n_shards = job.n_shards
    if not isinstance(n_shards, int) or isinstance(n_shards, bool) or n_shards < 1:
        raise ContractError(f"n_shards must be an integer >= 1, got {n_shards!r}")
    if job.output_dir is None or str(job.output_dir) == "":
        raise ContractError("output_dir is required: shards write split.N/ under it")
    indices = list(indices)
    if not indices:
        raise ContractError("the dataset is empty: nothing to shard")
    items = make_batches(indices, job.batch_size)
    if at_most_one_shard_per_item and n_shards > len(items):
        job = replace(job, n_shards=len(items))
        n_shards = job.n_shards
    if n_shards > len(items):
        unit = "batches" if job.batch_size else "items"
        raise ContractError(f"n_shards ({n_shards}) exceeds the number of {unit} ({len(items)}); lower n_shards")
    return ShardPlan(job=job, shards=split_contiguous(items, n_shards), n_items=len(indices))


def check_same_layout(plan: ShardPlan) -> None:
    """Refuse to resume over a ``manifest.json`` whose shards hold other items (ESPnet3's resume rule).

    No manifest yet is fine; so is one of the same layout with another fingerprint
    (its shards are redone). Nothing is deleted or written.

    Raises:
        ContractRuntimeError: The shard count or some shard's items (batching included) differ,
            or the manifest has no ``shards`` list.
        ContractError: The manifest is not valid JSON.
    """
    path = plan.manifest_path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"{path}: manifest is not valid JSON ({exc})") from None
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "items" in s for s in shards):
        raise ContractRuntimeError(f"Shard manifest is missing 'shards': {path}")
    advice = (
        "re-run with the original settings, pass resume=False to replan and overwrite, "
        f"or remove the existing shard outputs under {plan.root}"
    )
    if len(shards) != plan.n_shards:
        raise ContractRuntimeError(
            f"Cannot resume with a different number of parallel shards: {path} has {len(shards)} shard(s), "
            f"but this run planned {plan.n_shards}; {advice}"
        )
    ordered = sorted(shards, key=lambda s: s.get("shard_id", 0))
    changed = [i for i, (old, new) in enumerate(zip(ordered, plan.shards)) if decode_items(old["items"]) != new]
    if changed:
        shard_id = changed[0]
        old, new = decode_items(ordered[shard_id]["items"]), plan.shards[shard_id]
        raise ContractRuntimeError(
            f"Cannot resume because the shard plan changed: in {path}, split.{shard_id} "
            f"(of {len(changed)} changed shard(s)) holds {_describe_items(old)}, this run {_describe_items(new)} "
            f"(other indices or batch_size); {advice}"
        )


def _describe_items(items: List[Any]) -> str:
    """A short description of a shard's items for messages: count, first and last."""
    if not items:
        return "no items"
    unit = "batch(es)" if isinstance(items[0], list) else "item(s)"
    return f"{len(items)} {unit} {items[0]!r}..{items[-1]!r}"


def write_manifest(plan: ShardPlan) -> Path:
    """Write ``manifest.json`` atomically and return its path."""
    write_json_atomic(plan.manifest_path, plan.to_manifest())
    return plan.manifest_path


def read_manifest(path: Any) -> ShardPlan:
    """Load a :class:`ShardPlan` from ``manifest.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ContractError(f"{path}: manifest not found; run the plan step first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise ContractError(f"{path}: manifest version {version!r} is not {MANIFEST_VERSION}; run the plan step again")
    shards = [decode_items(s["items"]) for s in sorted(data["shards"], key=lambda s: s["shard_id"])]
    return ShardPlan(
        job=JobSpec.from_dict(data["job"]),
        shards=shards,
        n_items=data["n_items"],
        fingerprint=data["fingerprint"],
    )


def plan_job(job: JobSpec) -> ShardPlan:
    """Every plan-time check, then the shard plan of ``job``.

    Constructs the provider and the runner (their constructors check their
    options), checks that ``build_worker_setup_fn()`` returns a function, and
    counts the items (``items``, else the provider's dataset).
    """
    check_classes(job)
    provider = build_provider(job)
    build_runner(job, provider)
    check_setup_fn(provider, provider.build_worker_setup_fn())
    try:
        return make_plan(job, range(count_items(job, provider)))
    except ContractError as exc:
        raise ContractError(f"jobs.{job.name}: {exc}") from None
