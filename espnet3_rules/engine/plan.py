"""The shard plan: batching, contiguous balanced chunks, fingerprint, ``manifest.json``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from espnet3_rules.engine.contracts import ContractError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


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
    """What every shard of one run processes, and the fingerprint of what determines results.

    ``spec`` holds what determines results besides the items: runner and provider
    import paths, provider config and params, runner options, ``batch_size``.
    """

    spec: Dict[str, Any]
    output_dir: Path
    shard_subdir: str
    shards: List[List[Any]]
    n_items: int
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if not self.fingerprint:
            encoded = [encode_items(items) for items in self.shards]
            self.fingerprint = hashlib.sha256(
                canonical_json({"spec": self.spec, "shards": encoded}).encode("utf-8")
            ).hexdigest()

    @property
    def n_shards(self) -> int:
        """Number of shards."""
        return len(self.shards)

    @property
    def root(self) -> Path:
        """``output_dir/shard_subdir``: where ``manifest.json`` and ``split.N/`` live."""
        return self.output_dir / self.shard_subdir if self.shard_subdir else self.output_dir

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
        """The JSON document written to ``manifest.json``."""
        return {
            "version": MANIFEST_VERSION,
            "fingerprint": self.fingerprint,
            "output_dir": str(self.output_dir),
            "shard_subdir": self.shard_subdir,
            "n_items": self.n_items,
            "n_shards": self.n_shards,
            "spec": jsonable(self.spec),
            "shards": [
                {"shard_id": i, "n_items": len(items), "items": encode_items(items)}
                for i, items in enumerate(self.shards)
            ],
        }

    def summary(self) -> str:
        """One line: shards and items per shard."""
        sizes = [len(s) for s in self.shards]
        unit = "batches" if self.spec.get("batch_size") else "items"
        per = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
        return f"{self.n_shards} shards x {per} {unit} ({self.n_items} items, batch_size={self.spec.get('batch_size')})"


def make_plan(
    spec: Mapping[str, Any],
    indices: Sequence[Any],
    n_shards: int,
    output_dir: Any,
    shard_subdir: str = "",
    where: str = "",
) -> ShardPlan:
    """Batch ``indices`` and split them into ``n_shards`` contiguous shards.

    Refuses an empty item list and more shards than items (batches): every shard
    of the plan is a real job with work to do.
    """
    label = f"{where}: " if where else ""
    if not isinstance(n_shards, int) or isinstance(n_shards, bool) or n_shards < 1:
        raise ContractError(f"{label}n_shards must be an integer >= 1, got {n_shards!r}")
    if output_dir is None or str(output_dir) == "":
        raise ContractError(f"{label}output_dir is required: shards write split.N/ under it")
    indices = list(indices)
    if not indices:
        raise ContractError(f"{label}the dataset is empty: nothing to shard")
    items = make_batches(indices, spec.get("batch_size"))
    if n_shards > len(items):
        unit = "batches" if spec.get("batch_size") else "items"
        raise ContractError(
            f"{label}n_shards ({n_shards}) exceeds the number of {unit} ({len(items)}); lower n_shards"
        )
    return ShardPlan(
        spec=dict(spec),
        output_dir=Path(output_dir),
        shard_subdir=shard_subdir or "",
        shards=split_contiguous(items, n_shards),
        n_items=len(indices),
    )


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temp file, fsync and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    if data.get("version") != MANIFEST_VERSION:
        raise ContractError(f"{path}: manifest version {data.get('version')!r} is not {MANIFEST_VERSION}")
    shards = [decode_items(s["items"]) for s in sorted(data["shards"], key=lambda s: s["shard_id"])]
    return ShardPlan(
        spec=data["spec"],
        output_dir=Path(data["output_dir"]),
        shard_subdir=data["shard_subdir"],
        shards=shards,
        n_items=data["n_items"],
        fingerprint=data["fingerprint"],
    )
