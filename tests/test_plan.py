"""Shard plan: contiguous balanced chunks, manifest.json, fingerprint."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

import core_fixtures as fx
from espnet3_rules import InferenceRunner
from espnet3_rules.engine.plan import ShardPlan, make_plan, read_manifest, split_contiguous, write_manifest


# ---------------------------------------------------------------- chunks
def test_chunks_follow_espnet3_rule_first_remainder_shards_get_one_more():
    assert split_contiguous(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_contiguous(list(range(11)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    assert split_contiguous(list("abcde"), 5) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert split_contiguous(list(range(7)), 1) == [list(range(7))]


@pytest.mark.parametrize("n_items", range(1, 40))
def test_chunks_are_contiguous_and_balanced(n_items):
    items = [f"u{i}" for i in range(n_items)]
    for n_shards in range(1, n_items + 1):
        chunks = split_contiguous(items, n_shards)
        quotient, remainder = divmod(n_items, n_shards)
        assert [len(c) for c in chunks] == [quotient + 1] * remainder + [quotient] * (n_shards - remainder)
        assert [i for c in chunks for i in c] == items


def test_plan_chunks_batches_not_items():
    plan = make_plan({"batch_size": 2}, range(9), 2, "out")
    assert plan.shards == [[[0, 1], [2, 3], [4, 5]], [[6, 7], [8]]]
    assert plan.n_items == 9 and plan.n_shards == 2


# -------------------------------------------------------------- manifest
def manifest_of(plan):
    return json.loads(write_manifest(plan).read_text(encoding="utf-8"))


def test_manifest_content(tmp_path):
    runner = fx.CollectRunner(fx.WordsProvider({"n": 10}), output_dir=tmp_path, shard_subdir="dev", n_shards=3)
    plan = runner.plan(range(10))
    manifest = manifest_of(plan)
    assert manifest == {
        "version": 1,
        "fingerprint": plan.fingerprint,
        "output_dir": str(tmp_path),
        "shard_subdir": "dev",
        "n_items": 10,
        "n_shards": 3,
        "spec": {"runner": "core_fixtures.CollectRunner", "provider": "core_fixtures.WordsProvider",
                 "provider_config": {"n": 10}, "params": {}, "batch_size": None, "runner_kwargs": {}},
        "shards": [
            {"shard_id": 0, "n_items": 4, "items": {"range": [0, 4]}},
            {"shard_id": 1, "n_items": 3, "items": {"range": [4, 7]}},
            {"shard_id": 2, "n_items": 3, "items": {"range": [7, 10]}},
        ],
    }
    assert (tmp_path / "dev" / "manifest.json").exists() and not (tmp_path / "dev" / "split.0").exists()


def test_manifest_encodes_batches_as_ranges(tmp_path):
    manifest = manifest_of(make_plan({"batch_size": 3}, range(10), 2, tmp_path))
    assert [s["items"] for s in manifest["shards"]] == [
        {"range": [0, 6], "batch_size": 3}, {"range": [6, 10], "batch_size": 3}]
    assert [s["n_items"] for s in manifest["shards"]] == [2, 2], "n_items of a shard counts its batches"


def test_large_plans_stay_small():
    manifest = json.dumps(make_plan({}, range(200_000), 8, "out").to_manifest())
    assert len(manifest) < 2_000


ITEM_LISTS = {
    "consecutive ints": (list(range(5, 17)), None),
    "ints not consecutive": ([0, 2, 4, 6, 8], None),
    "ints out of order": ([3, 1, 2, 0], None),
    "strings": ([f"utt{i}" for i in range(7)], None),
    "floats": ([0.0, 1.0, 2.0, 3.0], None),
    "bools": ([True, False, True], None),
    "mixed": ([1, "a", 2.5, None], None),
    "batches": (list(range(11)), 3),
    "batches of strings": (list("abcdefg"), 2),
    "batches not from 0": (list(range(4, 13)), 4),
    "batches of ints not consecutive": ([0, 2, 4, 6, 8], 2),
    "one batch shorter than batch_size": (list(range(3)), 5),
}


@pytest.mark.parametrize("items, batch_size", ITEM_LISTS.values(), ids=ITEM_LISTS.keys())
def test_manifest_round_trips_items_exactly(tmp_path, items, batch_size):
    spec = {"runner": "r.R", "batch_size": batch_size}
    n_units = len(items) if batch_size is None else -(-len(items) // batch_size)
    for n_shards in range(1, min(3, n_units) + 1):
        plan = make_plan(spec, items, n_shards, tmp_path)
        loaded = read_manifest(write_manifest(plan))
        assert repr(loaded.shards) == repr(plan.shards), "same values and same types"
        assert [x for shard in loaded.shards for x in (sum(shard, []) if batch_size else shard)] == items
        assert (loaded.fingerprint, loaded.n_items, loaded.spec) == (plan.fingerprint, plan.n_items, plan.spec)
        recomputed = ShardPlan(spec=loaded.spec, output_dir=loaded.output_dir, shard_subdir="",
                               shards=loaded.shards, n_items=loaded.n_items)
        assert recomputed.fingerprint == plan.fingerprint


# ----------------------------------------------------------- fingerprint
def fingerprint(tmp_path, runner_cls=fx.CollectRunner, provider_cls=fx.CountingInferenceProvider,
                config=None, params=None, indices=range(10), **kwargs):
    """Fingerprint of a plan; every argument defaults to one base job."""
    provider = provider_cls(dict(config or {"n": 10, "lang": "en"}), params=dict(params or {"beam": 1}))
    kwargs.setdefault("output_dir", tmp_path / "out")
    kwargs.setdefault("n_shards", 2)
    return runner_cls(provider, **kwargs).plan(indices).fingerprint


CHANGES = {
    "batch_size": dict(batch_size=2),
    "params value": dict(params={"beam": 2}),
    "params key": dict(params={"beam": 1, "device": "cpu"}),
    "provider config": dict(config={"n": 10, "lang": "de"}),
    "n_shards": dict(n_shards=3),
    "fewer items": dict(indices=range(9)),
    "other items": dict(indices=range(1, 11)),
    "item order": dict(indices=[1, 0, *range(2, 10)]),
    "runner class": dict(runner_cls=fx.OtherCollectRunner),
    "provider class": dict(provider_cls=fx.OtherInferenceProvider),
}

SAME = {
    "nothing": dict(),
    "resume": dict(resume=False),
    "output_dir": dict(output_dir="elsewhere"),
    "shard_subdir": dict(shard_subdir="dev"),
    "config key order": dict(config={"lang": "en", "n": 10}),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_fingerprint_changes_with_what_determines_results(tmp_path, change):
    assert fingerprint(tmp_path, **change) != fingerprint(tmp_path)


@pytest.mark.parametrize("change", SAME.values(), ids=SAME.keys())
def test_fingerprint_ignores_what_does_not(tmp_path, change):
    assert fingerprint(tmp_path, **change) == fingerprint(tmp_path)


def test_fingerprint_same_for_omegaconf_and_dict_config(tmp_path):
    def plan(config):
        provider = fx.CountingInferenceProvider(config, params={"beam": 1})
        return fx.CollectRunner(provider, output_dir=tmp_path, n_shards=2).plan(range(10)).fingerprint

    assert plan(OmegaConf.create({"n": 10, "lang": "en"})) == plan({"n": 10, "lang": "en"})


def test_fingerprint_follows_runner_options(tmp_path):
    def plan(**kwargs):
        provider = fx.CountingInferenceProvider({"n": 4})
        runner = InferenceRunner(provider, output_dir=tmp_path, input_key="word", **kwargs)
        return runner.plan(range(4)).fingerprint

    assert plan(output_keys="text") == plan(output_keys=["text"]) != plan(output_keys=["text", "length"])
    assert plan() != plan(output_fn="core_fixtures.to_record")
