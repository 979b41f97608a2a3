"""Providers and runners for the core engine tests (importable by shard subprocesses)."""

import os
import signal
from pathlib import Path

from espnet3_rules import BaseRunner, EnvironmentProvider, InferenceProvider


class ListProvider(EnvironmentProvider):
    """dataset: n words; model: upper-case; optional kill_at item (SIGKILL the shard process)."""

    def build_env_local(self):
        return self.build_worker_setup_fn()()

    def build_worker_setup_fn(self):
        n, kill_at = int(self.config["n"]), self.config.get("kill_at")

        def setup():
            return {"dataset": [f"w{i}" for i in range(n)], "model": str.upper, "kill_at": kill_at}

        return setup


class CountingProvider(ListProvider):
    """Appends one line per forward call to ``calls_file`` (to count work without timing)."""

    def build_worker_setup_fn(self):
        setup, calls_file = super().build_worker_setup_fn(), self.config["calls_file"]
        return lambda: {**setup(), "calls_file": calls_file}


class DictSetupProvider(ListProvider):
    """Common mistake: build_worker_setup_fn returns the env itself."""

    def build_worker_setup_fn(self):
        return {"dataset": [], "model": None}


class RenamedProvider(EnvironmentProvider):
    """Common mistake: env keys that do not match forward's parameters."""

    def build_env_local(self):
        return {"ds": ["a"], "net": str.upper}

    def build_worker_setup_fn(self):
        return self.build_env_local


class TinyInferenceProvider(InferenceProvider):
    """InferenceProvider whose env keys are known without building anything."""

    @staticmethod
    def build_dataset(config):
        return [{"utt_id": f"u{i}", "x": i} for i in range(int(config["n"]))]

    @staticmethod
    def build_model(config):
        return lambda x: x


class TextRunner(BaseRunner):
    """ESPnet3 docs' MyTextRunner; SIGKILLs its own process at item ``kill_at``."""

    @staticmethod
    def forward(idx, dataset, model, kill_at=None, **env):
        if kill_at is not None and idx == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"utt_id": f"utt{idx}", "text": model(dataset[idx])}

    @staticmethod
    def open_writers(shard_dir: Path, **env):
        return {"text": (shard_dir / "text").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, **env):
        writers["text"].write(f'{result["utt_id"]} {result["text"]}\n')

    @staticmethod
    def close_writers(writers):
        for handle in writers.values():
            handle.close()
        return None

    def merge(self, shard_dirs):
        out_dir = self.output_dir / self.shard_subdir if self.shard_subdir else self.output_dir
        with (out_dir / "text").open("w", encoding="utf-8") as out:
            for shard_dir in sorted(shard_dirs):
                out.write((shard_dir / "text").read_text(encoding="utf-8"))
        return {}


class StateCloseRunner(TextRunner):
    """close_writers in the (writers, state, **env) shape, returning state metadata."""

    @staticmethod
    def close_writers(writers, state, **env):
        for handle in writers.values():
            handle.close()
        return {"closed_items": state["shard_id"]}


class CollectRunner(BaseRunner):
    """State-accumulating runner: no writer hooks, default merge returns all records."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        return {"idx": idx, "word": model(dataset[idx])}


class BatchRunner(BaseRunner):
    """Batch-aware forward: one index or a list of indices."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        if isinstance(idx, int):
            return model(dataset[idx])
        return [model(dataset[i]) for i in idx]


class CountingRunner(CollectRunner):
    """Counts forward calls in a file."""

    @staticmethod
    def forward(idx, dataset, model, calls_file, **env):
        with open(calls_file, "a", encoding="utf-8") as f:
            f.write(f"{idx}\n")
        return idx


class ExplicitRunner(BaseRunner):
    """forward without **env: only the names it declares are injected."""

    @staticmethod
    def forward(idx, dataset, model):
        return model(dataset[idx])


class SelfRunner(BaseRunner):
    """Common mistake: forward capturing self."""

    def forward(self, idx, dataset, model, **env):  # noqa: D102 - deliberately wrong
        return model(dataset[idx])


class NeedsDevice(BaseRunner):
    """forward that needs an env key ('device') the providers do not give."""

    @staticmethod
    def forward(idx, dataset, model, device, **env):
        return idx
