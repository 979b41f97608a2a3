"""The benchmark's user code, written for ESPnet3 (``espnet3.parallel``).

``run_bench.py`` runs these classes twice: as they are, under ESPnet3's
BaseRunner on a Dask LocalCluster, and with only the two import lines below
switched to ``espnet3_rules`` (see ``run_bench.switch_imports``), under
Snakemake. Nothing else differs between the two runs.

- ``ToneDecodeProvider`` / ``ToneDecodeRunner``: greedy CTC decoding of a
  tone-ASR test set (the built-in example's data and model) into ``hyp.scp``.
- ``EchoProvider`` / ``EchoRunner`` / ``EchoTextRunner``: a trivial forward,
  to measure the engine's own per-item and per-shard cost.
"""

from pathlib import Path

from espnet3.parallel.base_runner import BaseRunner, concatenate_shard_files
from espnet3.parallel.env_provider import EnvironmentProvider


class ToneDecodeProvider(EnvironmentProvider):
    """env: the tone-ASR test set in ``config.data_dir`` and the constructed CTC recogniser."""

    def build_env_local(self):
        return self.build_worker_setup_fn()()

    def build_worker_setup_fn(self):
        data_dir = str(self.config["data_dir"])

        def setup():
            from espnet3_rules.examples.tone_asr import KaldiDataset
            from espnet3_rules.examples.tone_asr.model import ToneCTCModel

            return {"dataset": KaldiDataset(data_dir), "model": ToneCTCModel(device="cpu")}

        return setup


class ToneDecodeRunner(BaseRunner):
    """Decode a batch of utterances; one ``<utt_id> <hyp>`` line each in ``split.N/hyp.scp``."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        batch = list(idx) if isinstance(idx, (list, tuple)) else [idx]
        samples = [dataset[i] for i in batch]
        outputs = model([s["speech"] for s in samples])
        return [{"utt_id": s["utt_id"], "hyp": o["hyp"]} for s, o in zip(samples, outputs)]

    @staticmethod
    def open_writers(shard_dir, **env):
        return {"hyp": (Path(shard_dir) / "hyp.scp").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, **env):
        for output in result:
            writers["hyp"].write(f"{output['utt_id']} {output['hyp']}\n")

    def merge(self, shard_dirs):
        out = Path(self.output_dir) / self.shard_subdir / "hyp.scp"
        concatenate_shard_files(shard_dirs, "hyp.scp", out)
        return str(out)


class EchoProvider(EnvironmentProvider):
    """env: ``config.n_items`` ints as the dataset and ``str`` as the model."""

    def build_env_local(self):
        return self.build_worker_setup_fn()()

    def build_worker_setup_fn(self):
        n_items = int(self.config["n_items"])

        def setup():
            return {"dataset": list(range(n_items)), "model": str}

        return setup


class EchoRunner(BaseRunner):
    """Trivial forward; results kept in the shard state (default hooks)."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        return model(dataset[idx])


class EchoTextRunner(EchoRunner):
    """Trivial forward; one ``<idx> <result>`` line per item in ``split.N/text``."""

    @staticmethod
    def open_writers(shard_dir, **env):
        return {"text": (Path(shard_dir) / "text").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, **env):
        writers["text"].write(f"{result} {result}\n")
