"""Collect-stats job: global mean/variance of the model's features, sharded.

Like ESPnet's ``collect_stats`` stage: each shard accumulates, in float64, the
frame count, the sum and the sum of squares of every feature dimension and
saves them to ``split.N/feats_stats.npz``; ``merge`` adds the shards up and
writes ``<output_dir>/<shard_subdir>/feats_stats.npz`` with ``count``,
``sum``, ``sum_square`` (the keys ESPnet's ``GlobalMVN`` reads) plus ``mean``
and ``var``. Features come from ``model(speech, output="feats")``, the call
the feats job makes, so the stats describe exactly the features it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from espnet3_rules.parallel.base_runner import BaseRunner
from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.engine.files import atomic_path
from espnet3_rules.engine.job import shard_root

STATS_NAME = "feats_stats.npz"


class FeatureSums:
    """Running float64 frame count, sum and sum of squares per feature dimension."""

    def __init__(self) -> None:
        """Start empty; the dimension is fixed by the first features added."""
        self.count = 0
        self.sum: Optional[np.ndarray] = None
        self.sum_square: Optional[np.ndarray] = None

    def add(self, feats: np.ndarray, what: str = "features") -> None:
        """Add one ``(frames, dim)`` feature matrix."""
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2:
            raise ContractError(f"{what} must be (frames, dim), got shape {feats.shape}")
        if self.sum is None:
            self.sum, self.sum_square = np.zeros(feats.shape[1]), np.zeros(feats.shape[1])
        elif feats.shape[1] != len(self.sum):
            raise ContractError(f"{what} have dim {feats.shape[1]}, earlier features had {len(self.sum)}")
        self.count += feats.shape[0]
        self.sum += feats.sum(axis=0)
        self.sum_square += np.square(feats).sum(axis=0)

    def merge(self, other: "FeatureSums") -> None:
        """Add another accumulator (the sums are associative)."""
        if other.sum is None:
            return
        if self.sum is None:
            self.count, self.sum, self.sum_square = other.count, other.sum.copy(), other.sum_square.copy()
            return
        if len(other.sum) != len(self.sum):
            raise ContractError(f"cannot add stats of dim {len(other.sum)} to stats of dim {len(self.sum)}")
        self.count += other.count
        self.sum += other.sum
        self.sum_square += other.sum_square

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """Global mean and (population) variance, as ESPnet's GlobalMVN computes them."""
        if not self.count:
            raise ContractError("no feature frames were accumulated")
        mean = self.sum / self.count
        return mean, np.maximum(self.sum_square / self.count - mean * mean, 0.0)

    def save(self, path: Path, with_moments: bool = False) -> Path:
        """Write ``count``/``sum``/``sum_square`` (and ``mean``/``var``) to ``.npz`` atomically."""
        arrays: Dict[str, Any] = {"count": np.int64(self.count), "sum": self.sum, "sum_square": self.sum_square}
        if with_moments:
            arrays["mean"], arrays["var"] = self.mean_var()
        path = Path(path)
        with atomic_path(path, durable=True) as tmp, tmp.open("wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> "FeatureSums":
        """Read what :meth:`save` wrote."""
        sums = cls()
        with np.load(path) as data:
            sums.count = int(data["count"])
            sums.sum, sums.sum_square = data["sum"].astype(np.float64), data["sum_square"].astype(np.float64)
        return sums

    @classmethod
    def of(cls, matrices: Iterable[np.ndarray]) -> "FeatureSums":
        """Accumulator over ``matrices``."""
        sums = cls()
        for feats in matrices:
            sums.add(feats)
        return sums


class CollectStatsRunner(BaseRunner):
    """Per-shard feature sums, merged into global mean/variance (``feats_stats.npz``).

    Args:
        provider: Provider of ``dataset`` (items with ``input_key``) and ``model``
            (``model(list_of_waveforms, output="feats")`` -> ``[{"feats": (T, D)}]``).
        input_key: Dataset item key holding the waveform (``forward`` sees it as an env default).
        **kwargs: BaseRunner arguments (``output_dir``, ``batch_size``, ``n_shards``...).
    """

    def __init__(self, provider: Any, input_key: str = "speech", **kwargs: Any):
        """Keep the input key."""
        super().__init__(provider, **kwargs)
        self.input_key = input_key

    @staticmethod
    def forward(idx: Any, dataset: Any = None, model: Any = None, input_key: str = "speech", **env: Any) -> FeatureSums:
        """Feature sums of one item or one batch."""
        indices = list(idx) if isinstance(idx, (list, tuple)) else [idx]
        items = [dataset[i] for i in indices]
        missing = [item.get("utt_id", i) for i, item in zip(indices, items) if input_key not in item]
        if missing:
            raise ContractError(f"input_key {input_key!r} not found in dataset items {missing[:3]}")
        outputs = model([item[input_key] for item in items], output="feats")
        return FeatureSums.of(out["feats"] for out in outputs)

    @staticmethod
    def open_writers(shard_dir: Optional[Path], **env: Any) -> Dict[str, Any]:
        """The shard's accumulator."""
        return {"shard_dir": Path(shard_dir), "sums": FeatureSums()}

    @staticmethod
    def write_record(writers: Dict[str, Any], result: FeatureSums, state: Dict[str, Any], **env: Any) -> None:
        """Fold one batch's sums into the shard's."""
        writers["sums"].merge(result)

    @staticmethod
    def close_writers(writers: Dict[str, Any], state: Optional[Dict[str, Any]] = None, **env: Any) -> Dict[str, Any]:
        """Save ``split.N/feats_stats.npz``; the shard state records its frame count."""
        writers["sums"].save(writers["shard_dir"] / STATS_NAME)
        return {"count": writers["sums"].count}

    def merge(self, shard_dirs: List[Path]) -> Dict[str, Any]:
        """Add the shards' sums (in shard order) and write the global ``feats_stats.npz``."""
        total = FeatureSums()
        for shard_dir in shard_dirs:
            path = Path(shard_dir) / STATS_NAME
            if not path.exists():
                raise ContractError(f"{path} is missing; rerun that shard")
            total.merge(FeatureSums.load(path))
        path = total.save(shard_root(self.output_dir, self.shard_subdir) / STATS_NAME, with_moments=True)
        return {"stats": str(path), "count": total.count, "dim": len(total.sum)}
