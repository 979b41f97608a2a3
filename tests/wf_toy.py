"""Toy provider/runner used by the workflow tests (imported by the snakemake subprocesses).

A shard fails on purpose when ``<poison_dir>/<item>`` exists, and holds (waits) on
an item while ``<poison_dir>/hold.<item>`` exists, so a test can make one shard
fail or stay running without touching the config (which would change the plan).
"""

import os
import time
from pathlib import Path

HOLD_LIMIT_S = 300

from espnet3_rules import BaseRunner, EnvironmentProvider


class WordsProvider(EnvironmentProvider):
    """dataset: ``n_items`` words; model: upper-cases a word; poison_dir: items to fail on."""

    def build_env_local(self):
        return self.build_worker_setup_fn()()

    def build_worker_setup_fn(self):
        n_items, suffix = int(self.config["n_items"]), str(self.config.get("suffix", ""))
        poison_dir = str(self.config.get("poison_dir", ""))

        def setup():
            dataset = [f"w{i:04d}{suffix}" for i in range(n_items)]
            return {"dataset": dataset, "model": str.upper, "poison_dir": poison_dir}

        return setup


class TextRunner(BaseRunner):
    """ESPnet3 docs' MyTextRunner: one ``<idx> <HYP>`` line per item into split.N/text."""

    @staticmethod
    def forward(idx, dataset, model, poison_dir="", **env):
        if poison_dir and (Path(poison_dir) / str(idx)).exists():
            raise RuntimeError(f"poisoned item {idx}")
        hold = Path(poison_dir) / f"hold.{idx}" if poison_dir else None
        if hold is not None and hold.exists():
            (Path(poison_dir) / f"started.{idx}").write_text(os.environ.get("SLURM_JOB_ID", ""))
            deadline = time.monotonic() + HOLD_LIMIT_S
            while hold.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        return {"idx": idx, "text": model(dataset[idx])}

    @staticmethod
    def open_writers(shard_dir, **env):
        return {"text": (shard_dir / "text").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, **env):
        writers["text"].write(f"{result['idx']} {result['text']}\n")

    def merge(self, shard_dirs):
        out = self.output_dir / self.shard_subdir / "text"
        with out.open("w", encoding="utf-8") as f:
            for shard_dir in shard_dirs:
                f.write((shard_dir / "text").read_text(encoding="utf-8"))
        return {"lines": sum(1 for _ in out.open(encoding="utf-8"))}


class SelfRunner(TextRunner):
    """The 'common mistake': forward capturing self."""

    def forward(self, idx, dataset, model, **env):  # noqa: D102 - deliberately wrong
        return model(dataset[idx])


class DeviceRunner(TextRunner):
    """Writes the device the shard was given and the GPUs it sees."""

    @staticmethod
    def forward(idx, dataset, model, device, **env):
        return {"idx": idx, "text": f"{device}@{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"}
