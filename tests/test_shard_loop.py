"""The shard loop: each record-hook style sees every item once, in order; progress covers every item;
an error names the item it happened at, however the items were sliced for the progress bar."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from tqdm import tqdm

from espnet3_rules import BaseRunner, EnvironmentProvider
from espnet3_rules.engine.plan import make_plan, write_manifest
from espnet3_rules.engine.shard import build_worker_env, load_state, progress_chunks, run_shard

POISON = 3000  # deep inside a slice once slices have grown


class ListProvider(EnvironmentProvider):
    def build_env_local(self):
        return self.build_worker_setup_fn()()

    def build_worker_setup_fn(self):
        n_items = self.config["n_items"]
        return lambda: {"dataset": [f"w{i}" for i in range(n_items)], "model": str.upper, "suffix": "!"}


class KeepRunner(BaseRunner):
    @staticmethod
    def forward(idx, dataset, model, suffix, **env):
        return model(dataset[idx]) + suffix


class WriteRunner(KeepRunner):
    @staticmethod
    def open_writers(shard_dir, **env):
        return {"text": (Path(shard_dir) / "text").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, shard_id):
        writers["text"].write(f"{shard_id} {result}\n")


class EnvWriteRunner(WriteRunner):
    @staticmethod
    def write_record(writers, result, state, **env):
        writers["text"].write(f"{env['shard_id']} {env['suffix']} {result}\n")


class FoldRunner(KeepRunner):
    @classmethod
    def reduce_state(cls, state, result, shard_id=None, **env):
        return {**state, "joined": state.get("joined", "") + result, "shard": shard_id}


class PoisonedKeep(KeepRunner):
    @staticmethod
    def forward(idx, dataset, model, suffix, **env):
        if idx == POISON:
            raise RuntimeError(f"poisoned {idx}")
        return idx


class PoisonedWrite(WriteRunner):
    @staticmethod
    def write_record(writers, result, state, shard_id):
        if result == f"W{POISON}!":
            raise ValueError("cannot write")


class PoisonedFold(FoldRunner):
    @classmethod
    def reduce_state(cls, state, result, **env):
        if result == f"W{POISON}!":
            raise KeyError("fold")
        return state


class FailingOpen(WriteRunner):
    @staticmethod
    def open_writers(shard_dir, **env):
        raise OSError("read-only")


class FailingClose(WriteRunner):
    @staticmethod
    def close_writers(writers, state=None, **env):
        raise OSError("disk gone")


def run_one(runner_cls, tmp_path, n_items=10, n_shards=2, shard_id=1):
    runner = runner_cls(ListProvider({"n_items": n_items}), output_dir=tmp_path, n_shards=n_shards)
    plan = make_plan(runner.job_spec(), range(n_items))
    write_manifest(plan)
    return plan, run_shard(runner_cls, plan, shard_id, build_worker_env(runner.provider))


def test_default_hooks_keep_every_result_in_order(tmp_path):
    plan, state = run_one(KeepRunner, tmp_path, n_items=20_000)
    assert state["records"] == [f"W{i}!" for i in range(10_000, 20_000)]
    assert load_state(plan.shard_dir(1))["records"] == state["records"]


@pytest.mark.parametrize("runner_cls, line", [(WriteRunner, "1 W{}!\n"), (EnvWriteRunner, "1 ! W{}!\n")])
def test_writer_hooks_get_the_bound_env_and_shard_id(tmp_path, runner_cls, line):
    plan, _ = run_one(runner_cls, tmp_path, n_items=20_000)
    assert (plan.shard_dir(1) / "text").read_text() == "".join(line.format(i) for i in range(10_000, 20_000))


def test_overridden_reduce_state_folds_a_new_state_per_item(tmp_path):
    _, state = run_one(FoldRunner, tmp_path)
    assert state["joined"] == "".join(f"W{i}!" for i in range(5, 10)) and state["shard"] == 1


@pytest.mark.parametrize("runner_cls, error", [(PoisonedKeep, RuntimeError), (PoisonedWrite, ValueError), (PoisonedFold, KeyError)])
def test_an_error_names_the_item_it_happened_at(tmp_path, runner_cls, error):
    with pytest.raises(error) as info:
        run_one(runner_cls, tmp_path, n_items=10_000, n_shards=1, shard_id=0)
    assert info.value.__notes__ == [f"{tmp_path / 'split.0'} item {POISON}"]
    assert not (tmp_path / "split.0" / "done").exists()


@pytest.mark.parametrize("runner_cls, stage", [(FailingOpen, "init_state"), (FailingClose, "finalize_state")])
def test_an_error_in_a_hook_names_the_stage(tmp_path, runner_cls, stage):
    with pytest.raises(OSError) as info:
        run_one(runner_cls, tmp_path)
    assert info.value.__notes__ == [f"{tmp_path / 'split.1'} ({stage})"]
    assert not (tmp_path / "split.1" / "done").exists()


@pytest.mark.parametrize("n_items", [0, 1, 7, 10_000])
def test_progress_chunks_cover_items_in_order(n_items):
    items = list(range(n_items))
    with tqdm(total=n_items, file=io.StringIO()) as progress:
        chunks = list(progress_chunks(items, progress, seconds=10.0, max_size=64))
        assert progress.n == n_items
    assert [i for chunk in chunks for i in chunk] == items
    assert all(len(c) <= 64 for c in chunks)
    if n_items >= 10_000:
        assert len(chunks) < n_items / 32, "fast items must be taken in growing slices"


def test_progress_chunks_stay_single_for_slow_items():
    items = list(range(5))
    with tqdm(total=5, file=io.StringIO()) as progress:
        sizes = [len(c) for c in progress_chunks(items, progress, seconds=0.0)]
    assert sizes == [1, 1, 1, 1, 1]


def test_progress_bar_reaches_every_item_in_the_shard_log(tmp_path, monkeypatch, capsys):
    run_one(KeepRunner, tmp_path, n_items=10_000, n_shards=1, shard_id=0)
    assert "10000/10000" in capsys.readouterr().err
