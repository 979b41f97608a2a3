"""Shard plan: contiguous balanced chunks, manifest.json, fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import toys as fx
from espnet3_rules import ContractError, InferenceRunner
from espnet3_rules.engine.job import JobSpec
from espnet3_rules.engine.plan import (
    ShardPlan,
    decode_items,
    encode_items,
    make_plan,
    read_manifest,
    split_contiguous,
    write_manifest,
)


def job(output_dir="out", n_shards=1, batch_size=None, **fields):
    """A JobSpec with only what the plan needs set."""
    return JobSpec(name="j", runner="r.R", provider="p.P", output_dir=str(output_dir), n_shards=n_shards,
                   batch_size=batch_size, **fields)


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
    plan = make_plan(job(n_shards=2, batch_size=2), range(9))
    assert plan.shards == [[[0, 1], [2, 3], [4, 5]], [[6, 7], [8]]]
    assert plan.n_items == 9 and plan.n_shards == 2


# -------------------------------------------------------------- manifest
def manifest_of(plan):
    return json.loads(write_manifest(plan).read_text(encoding="utf-8"))


def test_manifest_content(tmp_path):
    runner = fx.CollectRunner(fx.SampleProvider({"n": 10}), output_dir=tmp_path, shard_subdir="dev", n_shards=3)
    plan = fx.plan_of(runner, range(10))
    manifest = manifest_of(plan)
    assert manifest == {
        "version": 2,
        "fingerprint": plan.fingerprint,
        "job": {"name": "CollectRunner", "runner": "toys.CollectRunner", "provider": "toys.SampleProvider",
                "output_dir": str(tmp_path), "shard_subdir": "dev", "n_shards": 3, "batch_size": None,
                "provider_config": {"n": 10}, "params": {}, "runner_kwargs": {}, "items": None, "test_set": None,
                "inputs": [], "resources": {}},
        "n_items": 10,
        "n_shards": 3,
        "shards": [
            {"shard_id": 0, "n_items": 4, "items": {"range": [0, 4]}},
            {"shard_id": 1, "n_items": 3, "items": {"range": [4, 7]}},
            {"shard_id": 2, "n_items": 3, "items": {"range": [7, 10]}},
        ],
    }
    assert (tmp_path / "dev" / "manifest.json").exists() and not (tmp_path / "dev" / "split.0").exists()


def test_manifest_encodes_batches_as_ranges(tmp_path):
    manifest = manifest_of(make_plan(job(tmp_path, n_shards=2, batch_size=3), range(10)))
    assert [s["items"] for s in manifest["shards"]] == [
        {"range": [0, 6], "batch_size": 3}, {"range": [6, 10], "batch_size": 3}]
    assert [s["n_items"] for s in manifest["shards"]] == [2, 2], "n_items of a shard counts its batches"


def test_large_plans_stay_small():
    manifest = json.dumps(make_plan(job(n_shards=8), range(200_000)).to_manifest())
    assert len(manifest) < 2_000


@pytest.mark.parametrize(
    "items",
    [list(range(5, 12)), [[0, 1, 2], [3, 4, 5], [6]], ["a", "b"], [3, 1, 2], [[0, 1], [2]], [[0], [1, 2]],
     [[0, 1], [2, 3], [4, 5, 6]], [[2, 3], [0, 1]]],
    ids=["range", "batches", "strings", "unordered", "short last batch", "short first batch", "long last batch",
         "batches out of order"],
)
def test_items_encoding_round_trips_any_shard_shape(items):
    assert decode_items(json.loads(json.dumps(encode_items(items)))) == items


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
    n_units = len(items) if batch_size is None else -(-len(items) // batch_size)
    for n_shards in range(1, min(3, n_units) + 1):
        plan = make_plan(job(tmp_path, n_shards=n_shards, batch_size=batch_size), items)
        loaded = read_manifest(write_manifest(plan))
        assert repr(loaded.shards) == repr(plan.shards), "same values and same types"
        assert [x for shard in loaded.shards for x in (sum(shard, []) if batch_size else shard)] == items
        assert (loaded.fingerprint, loaded.n_items, loaded.job) == (plan.fingerprint, plan.n_items, plan.job)
        recomputed = ShardPlan(job=loaded.job, shards=loaded.shards, n_items=loaded.n_items)
        assert recomputed.fingerprint == plan.fingerprint


# ------------------------------------------------------------- job spec
FULL_JOB = dict(name="decode", runner="toys.BeamRunner", provider="toys.CountingInferenceProvider",
                output_dir="exp/decode", shard_subdir="test/clean", n_shards=3, batch_size=2,
                provider_config={"n": 7, "nested": {"lang": "en", "sizes": [1, 2]}}, params={"suffix": "!"},
                runner_kwargs={"beam": 5}, items=7, test_set="clean", inputs=["data/clean/text"],
                resources={"mem_mb": 4000, "gpu": 1})


def test_job_spec_round_trips_through_json_dict_and_manifest(tmp_path):
    spec = JobSpec(**dict(FULL_JOB, output_dir=str(tmp_path / "exp")))
    assert spec.root == tmp_path / "exp" / "test" / "clean"
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    text = spec.to_json()
    assert "resources" not in json.loads(text), "resources never change results: not part of what Snakemake compares"
    assert JobSpec.from_json(text) == JobSpec(**{**dict(FULL_JOB, output_dir=str(tmp_path / "exp")), "resources": {}})
    assert text == JobSpec.from_json(text).to_json(), "canonical: the same job gives the same text"
    plan = make_plan(spec, range(7))
    loaded = read_manifest(write_manifest(plan))
    assert loaded.job == spec and loaded.fingerprint == plan.fingerprint
    assert json.loads(plan.manifest_path.read_text())["job"] == spec.to_dict()


def test_job_spec_result_fields_and_unknown_fields():
    spec = JobSpec(**FULL_JOB)
    assert spec.result_fields() == {"runner": "toys.BeamRunner", "provider": "toys.CountingInferenceProvider",
                                    "provider_config": FULL_JOB["provider_config"], "params": {"suffix": "!"},
                                    "runner_kwargs": {"beam": 5}, "batch_size": 2}
    assert JobSpec(name="j", runner="r.R", provider="p.P", output_dir="o").root == Path("o")
    with pytest.raises(ContractError, match=r"^job description has unknown field\(s\) \['job', 'spec'\]$"):
        JobSpec.from_dict({**spec.to_dict(), "spec": {}, "job": "j"})


# ----------------------------------------------------------- fingerprint
def fingerprint(tmp_path, runner_cls=fx.CollectRunner, provider_cls=fx.CountingInferenceProvider,
                config=None, params=None, indices=range(10), **kwargs):
    """Fingerprint of a plan; every argument defaults to one base job."""
    provider = provider_cls(dict(config or {"n": 10, "lang": "en"}), params=dict(params or {"beam": 1}))
    kwargs.setdefault("output_dir", tmp_path / "out")
    kwargs.setdefault("n_shards", 2)
    return fx.plan_of(runner_cls(provider, **kwargs), indices).fingerprint


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
        return fx.plan_of(fx.CollectRunner(provider, output_dir=tmp_path, n_shards=2), range(10)).fingerprint

    assert plan(OmegaConf.create({"n": 10, "lang": "en"})) == plan({"n": 10, "lang": "en"})


def test_fingerprint_follows_runner_options(tmp_path):
    def plan(**kwargs):
        provider = fx.CountingInferenceProvider({"n": 4})
        runner = InferenceRunner(provider, output_dir=tmp_path, input_key="word", **kwargs)
        return fx.plan_of(runner, range(4)).fingerprint

    assert plan(output_keys=["text"]) == plan(output_keys=["text"]) != plan(output_keys=["text", "length"])
    assert plan() != plan(output_fn="toys.to_record")
