"""Shard engine: killed shards, atomic ``done`` with the plan fingerprint, staleness, resume."""

from __future__ import annotations

import json
import shutil

import pytest

import toys as fx
from espnet3_rules import ContractError
from espnet3_rules.engine.attempts import ATTEMPTS_NAME
from espnet3_rules.engine.merge import completed_shard_dirs, merge_plan, pending_shards
from espnet3_rules.engine.plan import read_manifest
from espnet3_rules.engine.shard import is_shard_done, run_shard

# Items 0..8 in 3 shards: split.1 holds items 3, 4, 5; the kill happens at item 5.
KILLED_SHARD, KILL_AT = 1, 5
JOBS = {
    "docs text runner": dict(runner="toys.ProbeTextRunner", provider="toys.SampleProvider",
                             provider_config={"n": 9}),
    "inference runner": dict(runner="espnet3_rules.InferenceRunner", provider="toys.CountingInferenceProvider",
                             provider_config={"n": 9},
                             runner_kwargs={"input_key": "word", "output_fn": "toys.to_record"}),
}


def shard_files(shard_dir):
    """Shard files, with ``done`` reduced to what does not depend on the process."""
    files = fx.snapshot(shard_dir)
    done = json.loads(files.pop("done"))
    done.pop("pid")
    return files, done


@pytest.mark.parametrize("job", JOBS.values(), ids=JOBS.keys())
def test_killed_shard_leaves_no_done_and_rerun_is_byte_identical(tmp_path, job):
    config = fx.write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), n_shards=3, **job)
    fx.run_main("plan", "--config", config, "--job", "j")
    manifest = tmp_path / "out" / "manifest.json"
    shard_dir = tmp_path / "out" / f"split.{KILLED_SHARD}"
    run = ("run-shard", "--manifest", manifest, "--shard", KILLED_SHARD)

    fx.cli(*run)
    clean_files, clean_done = shard_files(shard_dir)
    assert clean_done == {"fingerprint": json.loads(manifest.read_text())["fingerprint"],
                          "shard_id": KILLED_SHARD, "n_items": 3}

    for fresh in (False, True):  # over the finished shard, then from an empty shard directory
        if fresh:
            shutil.rmtree(shard_dir)
        killed = fx.cli(*run, env={fx.KILL_AT: str(KILL_AT)}, check=False)
        assert killed.returncode == -9, killed.stderr
        assert not (shard_dir / "done").exists()
        assert not is_shard_done(read_manifest(manifest), KILLED_SHARD)
        if job["runner"].endswith("ProbeTextRunner"):
            assert (shard_dir / "text").read_text() == fx.expected_text([3, 4]), "the shard died mid-write"
        fx.cli(*run)
        assert shard_files(shard_dir) == (clean_files, clean_done)


def test_forward_error_leaves_no_done_and_removes_an_old_one(tmp_path, monkeypatch):
    runner = fx.ProbeTextRunner(fx.SampleProvider({"n": 6}), output_dir=tmp_path, n_shards=2)
    runner(range(6))
    monkeypatch.setenv(fx.FAIL_AT, "4")
    assert runner(range(6)) == {}, "resume: every shard is done, nothing runs"
    runner.resume = False
    with pytest.raises(RuntimeError, match="forward failed at item 4"):
        runner(range(6))
    assert (tmp_path / "split.0" / "done").exists() and not (tmp_path / "split.1" / "done").exists()
    assert (tmp_path / "split.1" / "text").read_text() == fx.expected_text([3])


def test_unpicklable_shard_state_is_a_contract_error_and_no_done(tmp_path):
    runner = fx.UnpicklableRunner(fx.SampleProvider({"n": 2}), output_dir=tmp_path)
    with pytest.raises(ContractError, match=r"shard state of .*split\.0 cannot be pickled") as info:
        runner(range(2))
    assert info.value.__notes__ == [f"{tmp_path / 'split.0'} (save_state)"]
    assert sorted(p.name for p in (tmp_path / "split.0").iterdir()) == [ATTEMPTS_NAME], "no result file is left"


# ---------------------------------------------------------------- resume
def counting_runner(tmp_path, n=6, n_shards=3, runner_cls=fx.CollectRunner, params=None, **kwargs):
    """A runner over CountingInferenceProvider whose forward logs each call to ``tmp_path/calls``."""
    provider = fx.CountingInferenceProvider({"n": n}, params={"calls_file": str(tmp_path / "calls"), **(params or {})})
    return runner_cls(provider, output_dir=tmp_path / "out", n_shards=n_shards, **kwargs)


def calls_of(tmp_path, runner, indices):
    """Forward calls made by ``runner(indices)``."""
    (tmp_path / "calls").write_text("")
    result = runner(indices)
    assert [r["idx"] for r in result] == list(indices)
    return fx.read_lines(tmp_path / "calls")


def test_resume_skips_done_shards_of_the_same_plan_only(tmp_path):
    runner = counting_runner(tmp_path)
    out = tmp_path / "out"
    assert calls_of(tmp_path, runner, range(6)) == ["0", "1", "2", "3", "4", "5"]
    assert calls_of(tmp_path, runner, range(6)) == []
    (out / "split.1" / "done").unlink()
    assert calls_of(tmp_path, runner, range(6)) == ["2", "3"]
    (out / "split.2" / "done").write_text('{"fingerprint": ')  # torn write
    assert calls_of(tmp_path, runner, range(6)) == ["4", "5"]
    (out / "split.0" / "done").write_text(json.dumps({"fingerprint": "0" * 64, "shard_id": 0}))
    assert calls_of(tmp_path, runner, range(6)) == ["0", "1"]
    runner.resume = False
    assert calls_of(tmp_path, runner, range(6)) == ["0", "1", "2", "3", "4", "5"]


def test_done_is_json_holding_the_plan_fingerprint(tmp_path):
    runner = counting_runner(tmp_path)
    runner(range(6))
    plan = fx.plan_of(runner, range(6))
    for shard_id in range(3):
        done = json.loads((plan.shard_dir(shard_id) / "done").read_text())
        assert (done["fingerprint"], done["shard_id"], done["n_items"]) == (plan.fingerprint, shard_id, 2)
    merge_done = json.loads((tmp_path / "out" / "merge.done").read_text())
    assert merge_done["fingerprint"] == plan.fingerprint and merge_done["n_shards"] == 3


#: A change of the shard layout needs resume=False in runner(indices) (with resume=True it is refused, as ESPnet3).
REPLANS = {
    "batch_size": (fx.BatchRunner, dict(batch_size=2, resume=False), ["[0, 1]", "[2, 3]", "[4, 5]"]),
    "params": (fx.CollectRunner, dict(params={"suffix": "!"}), ["0", "1", "2", "3", "4", "5"]),
    "n_shards": (fx.CollectRunner, dict(n_shards=2, resume=False), ["0", "1", "2", "3", "4", "5"]),
    "items": (fx.CollectRunner, dict(n=7, resume=False), ["0", "1", "2", "3", "4", "5", "6"]),
}


@pytest.mark.parametrize("runner_cls, change, expected_calls", REPLANS.values(), ids=REPLANS.keys())
def test_done_from_an_older_plan_is_not_counted(tmp_path, runner_cls, change, expected_calls):
    counting_runner(tmp_path, runner_cls=runner_cls)(range(6))
    runner = counting_runner(tmp_path, runner_cls=runner_cls, **change)
    indices = range(runner.provider.config["n"])
    plan = fx.plan_of(runner, indices)
    assert pending_shards(plan) == list(range(plan.n_shards))
    with pytest.raises(ContractError, match=r"stale \(done from another plan\)"):
        completed_shard_dirs(plan)
    (tmp_path / "calls").write_text("")
    runner(indices)
    assert fx.read_lines(tmp_path / "calls") == expected_calls
    assert pending_shards(plan) == []


def test_merge_lists_missing_and_stale_shards(tmp_path):
    counting_runner(tmp_path, n_shards=3)(range(6))
    runner = counting_runner(tmp_path, n_shards=3, params={"suffix": "!"})
    plan = fx.plan_of(runner, range(6))
    run_shard(type(runner), plan, 0, runner.provider.build_env_local())
    (plan.shard_dir(2) / "done").unlink()
    with pytest.raises(ContractError) as info:
        merge_plan(runner, plan)
    assert str(info.value).startswith(f"cannot merge {tmp_path / 'out'}: shards not done: split.2; "
                                      "stale (done from another plan): split.1; run those shards first")
    assert not (plan.shard_dir(1) / "done").exists() and (plan.shard_dir(1) / "done.rejected").exists(), \
        "the stale done is set aside, so Snakemake reruns that shard"
    merge_done = tmp_path / "out" / "merge.done"
    assert not merge_done.exists() or json.loads(merge_done.read_text())["fingerprint"] != plan.fingerprint, \
        "only a successful merge writes merge.done for this plan"


def test_mismatched_env_names_of_an_undeclared_provider_stop_the_shard_before_it_writes(tmp_path):
    runner = fx.MyTextRunner(fx.RenamedProvider({"n": 2}), output_dir=tmp_path)
    with pytest.raises(ContractError, match=r"^MyTextRunner\.forward needs 'dataset', 'model' but RenamedProvider's "
                                            r"env provides \['ds', 'net', 'output_dir'\]"):
        runner(range(2))
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["manifest.json"], "split.0/ holds no file"
