"""A provider and a runner written for ESPnet3 (``espnet3.parallel``), writing ``hyp.scp`` per shard.

The reference tests run this file as it is and, mechanically switched, with only the
import lines below pointing at ``espnet3_rules``.
"""

from pathlib import Path

from espnet3.parallel.base_runner import BaseRunner, concatenate_shard_files
from espnet3.parallel.env_provider import EnvironmentProvider

from espnet3_user.data import WordModel, make_items


class WordsProvider(EnvironmentProvider):
    """env: ``dataset`` (``config.n_items`` toy items), ``model`` and ``joiner`` (``config.joiner``)."""

    def build_env_local(self):
        return self.build_worker_setup_fn()()

    def build_worker_setup_fn(self):
        n_items = int(self.config["n_items"])
        seed = int(self.config.get("seed", 0))
        joiner = str(self.config.get("joiner", " "))

        def setup():
            return {"dataset": make_items(n_items, seed), "model": WordModel(joiner), "joiner": joiner}

        return setup


class WordsRunner(BaseRunner):
    """One ``<utt_id> <hyp> (<joiner>)`` line per item in ``split.N/hyp.scp``; merged into ``hyp<suffix>.scp``."""

    def __init__(self, provider, suffix="", **kwargs):
        super().__init__(provider, **kwargs)
        self.suffix = suffix

    @staticmethod
    def forward(idx, dataset, model, joiner, **env):
        batch = list(idx) if isinstance(idx, (list, tuple)) else [idx]
        return [{"utt_id": dataset[i]["utt_id"], "hyp": model(dataset[i]["text"]), "joiner": joiner} for i in batch]

    @staticmethod
    def open_writers(shard_dir, **env):
        return {"hyp": (Path(shard_dir) / "hyp.scp").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, **env):
        for output in result:
            writers["hyp"].write(f"{output['utt_id']} {output['hyp']} ({output['joiner']})\n")
        state["n_written"] = state.get("n_written", 0) + len(result)

    def merge(self, shard_dirs):
        out = Path(self.output_dir) / self.shard_subdir / f"hyp{self.suffix}.scp"
        concatenate_shard_files(shard_dirs, "hyp.scp", out)
        with out.open(encoding="utf-8") as merged:
            lines = sum(1 for _ in merged)
        return {"file": out.name, "lines": lines, "shards": len(shard_dirs)}
