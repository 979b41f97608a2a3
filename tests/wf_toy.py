"""Toy provider/runner used by the workflow tests (imported by the snakemake subprocesses).

A shard fails on purpose when ``<poison_dir>/<item>`` exists, and holds (waits) on
an item while ``<poison_dir>/hold.<item>`` exists, so a test can make one shard
fail or stay running without touching the config (which would change the plan).
The hooks are also fault points of :mod:`faults` (inert unless ESPNET3_RULES_FAULT is set).
"""

import os
import time
from pathlib import Path

import faults
from espnet3_rules import BaseRunner, EnvironmentProvider, InferenceProvider

HOLD_LIMIT_S = 300


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
    def forward(idx, dataset, model, poison_dir="", output_dir="", shard_subdir="", **env):
        faults.at("forward", Path(output_dir, shard_subdir, f"item.{idx}"))
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
        faults.at("open_writers", shard_dir)
        return {"text": (shard_dir / "text").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, **env):
        faults.write(writers["text"], f"{result['idx']} {result['text']}\n", "write_record")

    @staticmethod
    def close_writers(writers):
        BaseRunner.close_writers(writers)
        faults.at("close_writers", Path(writers["text"].name).parent)

    def merge(self, shard_dirs):
        out = self.output_dir / self.shard_subdir / "text"
        with out.open("w", encoding="utf-8") as f:
            for shard_dir in shard_dirs:
                faults.write(f, (shard_dir / "text").read_text(encoding="utf-8"), "merge")
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


class SuffixRunner(TextRunner):
    """A runner with its own constructor option: ``suffix`` is appended to every text, and the merge
    checks and reports it (``merge.done``'s result), so a test sees the option reach shards and merge."""

    def __init__(self, provider, suffix="", **kwargs):
        super().__init__(provider, **kwargs)
        self.suffix = suffix

    @staticmethod
    def forward(idx, dataset, model, suffix="", **env):
        result = TextRunner.forward(idx, dataset, model, **env)
        return {**result, "text": result["text"] + suffix}

    def merge(self, shard_dirs):
        result = super().merge(shard_dirs)
        lines = (self.output_dir / self.shard_subdir / "text").read_text(encoding="utf-8").splitlines()
        if not all(line.endswith(self.suffix) for line in lines):
            raise RuntimeError(f"a shard did not get suffix {self.suffix!r}")
        return {**result, "suffix": self.suffix}


class DictSetupProvider(WordsProvider):
    """Common mistake: build_worker_setup_fn returns the env itself."""

    def build_worker_setup_fn(self):
        return super().build_worker_setup_fn()()


class RenamedProvider(EnvironmentProvider):
    """Common mistake: env keys that do not match forward's parameters."""

    def build_env_local(self):
        return {"ds": ["a"] * 4, "net": str.upper}

    def build_worker_setup_fn(self):
        return self.build_env_local


class BrokenInitProvider(WordsProvider):
    """A provider whose constructor fails (only the plan rule constructs one)."""

    def __init__(self, config):
        raise RuntimeError("BrokenInitProvider cannot reach its model store")


def mark(config, name):
    """Leave ``<config.marker_dir>/<name>``: proof that a hook ran."""
    Path(config["marker_dir"], name).touch()


class MarkingProvider(WordsProvider):
    """Leaves a marker file from ``__init__``, ``build_env_local``, ``build_worker_setup_fn`` and the setup
    function (``marker_dir`` in its config): what ran while planning or running."""

    def __init__(self, config):
        super().__init__(config)
        mark(config, "init")

    def build_env_local(self):
        mark(self.config, "build_env_local")
        return super().build_env_local()

    def build_worker_setup_fn(self):
        config, setup = self.config, super().build_worker_setup_fn()
        mark(config, "build_worker_setup_fn")

        def marked_setup():
            mark(config, "setup")
            return setup()

        return marked_setup


class UttProvider(InferenceProvider):
    """InferenceProvider: items ``{"utt_id", "text"}`` (``ids`` from the config, else ``utt<i>``); model: upper-case."""

    @staticmethod
    def build_dataset(config):
        ids = list(config.get("ids") or (f"utt{i}" for i in range(int(config["n_items"]))))
        return [{"utt_id": utt_id, "text": f"w{i:04d}"} for i, utt_id in enumerate(ids)]

    @staticmethod
    def build_model(config):
        return upper


class LinesProvider(UttProvider):
    """Items from the UTF-8 text file ``config.path``, one ``<utt_id> <text>`` line each."""

    @staticmethod
    def build_dataset(config):
        with open(config["path"], encoding="utf-8") as f:
            return [dict(zip(("utt_id", "text"), line.split(maxsplit=1))) for line in f if line.strip()]


def upper(text):
    """The toy model."""
    return text.upper()


def hyp_fields(data, model_output, idx):
    """output_fn: two fields (``hyp``, ``n_chars``); fault point ``output_fn`` on ``item.<idx>``."""
    faults.at("output_fn", f"item.{idx}")
    return {"utt_id": data["utt_id"], "hyp": model_output, "n_chars": len(model_output)}


def not_a_dict(data, model_output, idx):
    """output_fn mistake: the bare model output."""
    return model_output


def no_id(data, model_output, idx):
    """output_fn mistake: no id key."""
    return {"hyp": model_output}


def two_lines(data, model_output, idx):
    """output_fn mistake: a value with a newline."""
    return {"utt_id": data["utt_id"], "hyp": f"{model_output}\nsecond line"}


class NoModelProvider(UttProvider):
    """Its model cannot be built (a marker, then an error): only its static build_dataset may run."""

    @staticmethod
    def build_model(config):
        mark(config, "build_model")
        raise RuntimeError("build_model must not run here")
