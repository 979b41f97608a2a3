"""BaseRunner programs of ESPnet3's "Provider and Runner" page: its examples and its common mistakes.

Each ``program_*`` function is one user program: it takes an ``output_dir`` (relative:
the conformance harness runs it in a fresh working directory) and returns what the
user would look at. The conformance tests run this file as it is (under ESPnet3) and
with only its import lines switched (under espnet3_rules).
"""

from pathlib import Path

from espnet3.parallel.base_runner import BaseRunner
from espnet3.parallel.env_provider import EnvironmentProvider

from espnet3_user.data import WordModel, make_items

N_ITEMS = 7
#: ``forward`` calls of this module's runners since the last :func:`reset_calls` (in-process runs only).
CALLS = []


def reset():
    """Called by the harness before each program."""
    CALLS.clear()


class MyProvider(EnvironmentProvider):
    """The page's provider: ``dataset``, ``model`` and ``device``, local and per worker alike."""

    def build_env_local(self):
        return self.build_worker_setup_fn()()

    def build_worker_setup_fn(self):
        n_items = int(self.config["n_items"])

        def setup():
            return {"dataset": make_items(n_items), "model": WordModel(), "device": "cpu"}

        return setup


class MyTextRunner(BaseRunner):
    """The page's minimal file-writing runner (static ``forward``, writer hooks, a ``merge``), with
    ``close_writers`` taking ``(writers, state, **env)`` as ESPnet3 202611 calls it (see :class:`PageTextRunner`)."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        CALLS.append(idx)
        sample = dataset[idx]
        return {"utt_id": sample["utt_id"], "text": model(sample["text"])}

    @staticmethod
    def open_writers(shard_dir: Path, **env):
        return {"text": (shard_dir / "text").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, **env):
        writers["text"].write(f'{result["utt_id"]} {result["text"]}\n')

    @staticmethod
    def close_writers(writers, state, **env):
        for handle in writers.values():
            handle.close()
        return None

    def merge(self, shard_dirs):
        out_dir = self.output_dir / self.shard_subdir if self.shard_subdir else self.output_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "text").open("w", encoding="utf-8") as out_f:
            for shard_dir in sorted(shard_dirs):
                shard_path = shard_dir / "text"
                if not shard_path.exists():
                    continue
                out_f.write(shard_path.read_text(encoding="utf-8"))
        return {}


class PageTextRunner(MyTextRunner):
    """``close_writers(writers)`` exactly as the page writes it; ESPnet3 202611 calls it with ``state`` and the env."""

    @staticmethod
    def close_writers(writers):
        for handle in writers.values():
            handle.close()
        return None


class ClassForwardRunner(MyTextRunner):
    """``forward`` as a ``@classmethod`` (ESPnet3's own InferenceRunner does this)."""

    PREFIX = "cls:"

    @classmethod
    def forward(cls, idx, dataset, model, **env):
        CALLS.append(idx)
        sample = dataset[idx]
        return {"utt_id": sample["utt_id"], "text": cls.PREFIX + model(sample["text"])}


class DeviceRunner(MyTextRunner):
    """Name-based env injection: ``device`` declared as a parameter of ``forward``."""

    @staticmethod
    def forward(idx, dataset, model, device, **env):
        sample = dataset[idx]
        return {"utt_id": sample["utt_id"], "text": f"{model(sample['text'])}@{device}"}


class BatchAwareRunner(MyTextRunner):
    """The page's batch-aware ``forward``: one index or a list of them; one line per batch."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        if isinstance(idx, int):
            return {"utt_id": dataset[idx]["utt_id"], "text": model(dataset[idx]["text"])}
        batch = [dataset[i] for i in idx]
        return {"utt_id": "+".join(s["utt_id"] for s in batch), "text": "|".join(model([s["text"] for s in batch]))}


class MyCollectRunner(BaseRunner):
    """The page's state-accumulating runner: no writers; its ``merge`` returns None."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        return {"idx": idx, "score": float(len(model(dataset[idx]["text"])))}

    def merge(self, shard_dirs):
        return None


class DefaultMergeRunner(BaseRunner):
    """No ``merge`` of its own: BaseRunner's default decides what ``runner(indices)`` returns."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        return {"idx": idx, "text": model(dataset[idx]["text"])}


def run(runner_cls, output_dir, indices=None, provider_cls=MyProvider, **kwargs):
    """Build the provider and runner as a user does, and run them over ``indices``."""
    from omegaconf import OmegaConf

    provider = provider_cls(OmegaConf.create({"n_items": N_ITEMS}))
    runner = runner_cls(provider, output_dir=output_dir, **kwargs)
    return runner(range(N_ITEMS) if indices is None else indices)


def program_text_runner(output_dir):
    return run(MyTextRunner, output_dir)


def program_page_close_writers(output_dir):
    return run(PageTextRunner, output_dir)


def program_text_runner_subdir(output_dir):
    return run(MyTextRunner, output_dir, shard_subdir="dev")


def program_classmethod_forward(output_dir):
    return run(ClassForwardRunner, output_dir)


def program_env_injection_by_name(output_dir):
    return run(DeviceRunner, output_dir)


def program_batch_aware_forward(output_dir):
    return run(BatchAwareRunner, output_dir, batch_size=3)


def program_collect_runner(output_dir):
    return run(MyCollectRunner, output_dir)


def program_default_merge(output_dir):
    return run(DefaultMergeRunner, output_dir)


def program_is_shard_done(output_dir):
    """``is_shard_done`` before and after a run, on the run's shard and on one that never existed."""
    shard = Path(output_dir) / "split.0"
    before = MyTextRunner.is_shard_done(shard)
    run(MyTextRunner, output_dir)
    return [before, MyTextRunner.is_shard_done(shard), MyTextRunner.is_shard_done(Path(output_dir) / "split.1")]


def program_rerun_skips_done_shards(output_dir):
    """A second identical run resumes: no ``forward`` call, the same outputs and return value."""
    first = run(MyTextRunner, output_dir)
    reset()
    second = run(MyTextRunner, output_dir)
    return [first, second, len(CALLS)]


def program_missing_output_dir(output_dir):
    return run(MyTextRunner, None)


def program_nonpositive_batch_size(output_dir):
    return run(MyTextRunner, output_dir, batch_size=0)


# ------------------------------------------------------------------ the page's "common mistakes"
class SelfCapturingRunner(MyTextRunner):
    """Mistake: an instance-method ``forward`` (captures ``self``)."""

    def forward(self, idx):  # wrong
        return {"utt_id": str(idx), "text": "x"}


class RebuildingRunner(MyTextRunner):
    """Mistake: building the model inside ``forward`` (slow, but it still works)."""

    @staticmethod
    def forward(idx, dataset, **env):
        sample = dataset[idx]
        return {"utt_id": sample["utt_id"], "text": WordModel()(sample["text"])}


class EnvInsteadOfSetupProvider(MyProvider):
    """Mistake: ``build_worker_setup_fn`` returns the env instead of a setup function.

    Local runs only call ``build_env_local``, which is correct here.
    """

    def build_env_local(self):
        return {"dataset": make_items(int(self.config["n_items"])), "model": WordModel()}

    def build_worker_setup_fn(self):
        return {"dataset": make_items(int(self.config["n_items"])), "model": WordModel()}  # wrong


class MismatchedNamesProvider(MyProvider):
    """Mistake: env keys that do not match ``forward``'s parameter names."""

    def build_env_local(self):
        return {"ds": make_items(int(self.config["n_items"])), "net": WordModel()}


class NoMergeRunner(MyTextRunner):
    """Mistake: writer hooks but no ``merge``: the outputs stay split across ``split.N/``."""

    merge = BaseRunner.merge


def program_mistake_self_forward(output_dir):
    return run(SelfCapturingRunner, output_dir)


def program_mistake_model_in_forward(output_dir):
    return run(RebuildingRunner, output_dir)


def program_mistake_env_instead_of_setup_fn(output_dir):
    return run(MyTextRunner, output_dir, provider_cls=EnvInsteadOfSetupProvider)


def program_mistake_mismatched_env_names(output_dir):
    return run(MyTextRunner, output_dir, provider_cls=MismatchedNamesProvider)


def program_mistake_no_merge(output_dir):
    return run(NoMergeRunner, output_dir)
