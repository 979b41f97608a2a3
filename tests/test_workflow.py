"""Integration tests: the real Snakemake CLI on the project's Snakefile in temp dirs."""

import json

import pytest
import yaml

from workflow_driver import REPO, expected_text, job, job_counts


def test_dry_run_lists_every_shard_and_plan_summary(wf):
    wf.write_config({"a": job("a", n_items=10, n_shards=4), "b": job("b", n_items=6, n_shards=2)})
    _, out = wf.snakemake("-n")
    assert job_counts(out) == {"plan": 2, "shard": 6, "merge": 2, "all": 1}
    assert "job a (results/a): 4 shards x 2-3 items (10 items, batch_size=None)" in out
    assert "job b (results/b): 2 shards x 3 items (6 items, batch_size=None)" in out
    assert not (wf.path / "results").exists(), "a dry-run must not write anything"


def test_run_merges_then_second_run_is_noop(wf):
    wf.write_config({"a": job("a", n_items=10, n_shards=3)})
    wf.snakemake("--cores", "2")
    root = wf.path / "results" / "a"
    assert (root / "text").read_text() == expected_text(10)
    assert sorted(p.name for p in root.glob("split.*")) == ["split.0", "split.1", "split.2"]
    assert all((root / f"split.{i}" / "done").exists() for i in range(3))
    assert (root / "logs" / "split.1.log").exists() and (root / "benchmarks" / "split.1.tsv").exists()
    _, out = wf.snakemake("--cores", "2")
    assert "Nothing to be done" in out


def test_failed_shard_keep_going_then_rerun_only_it(wf):
    wf.write_config({"a": job("a", n_items=12, n_shards=4)})
    wf.poison(7)  # item 7 lives in shard 2 (items 6..8)
    code, out = wf.snakemake("--cores", "2", "--keep-going", check=False)
    assert code != 0
    assert "results/a/logs/split.2.log" in out, "Snakemake must point at the failed shard's log"
    assert "poisoned item 7" in (wf.path / "results/a/logs/split.2.log").read_text()
    root = wf.path / "results" / "a"
    assert [(root / f"split.{i}" / "done").exists() for i in range(4)] == [True, True, False, True]
    assert not (root / "merge.done").exists() and not (root / "text").exists()

    wf.cure(7)
    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out) == {"shard": 1, "merge": 1, "all": 1}
    assert (root / "text").read_text() == expected_text(12)


def test_deleted_done_reruns_that_shard_and_merge(wf):
    wf.write_config({"a": job("a", n_items=6, n_shards=3)})
    wf.snakemake("--cores", "2")
    (wf.path / "results/a/split.1/done").unlink()
    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out) == {"shard": 1, "merge": 1, "all": 1}


def test_params_change_reruns_only_that_jobs_shards(wf):
    jobs = {"a": job("a", n_items=6, n_shards=3), "b": job("b", n_items=4, n_shards=2)}
    wf.write_config(jobs)
    wf.snakemake("--cores", "2")
    jobs["a"]["provider_config"]["suffix"] = "x"
    wf.write_config(jobs)
    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out) == {"plan": 1, "shard": 3, "merge": 1, "all": 1}
    assert (wf.path / "results/a/text").read_text() == expected_text(6, "x")
    assert (wf.path / "results/b/text").read_text() == expected_text(4)


def test_resources_change_reruns_nothing(wf):
    jobs = {"a": job("a", n_items=4, n_shards=2)}
    wf.write_config(jobs)
    wf.snakemake("--cores", "2")
    jobs["a"]["resources"] = {"mem_mb": 1234, "runtime": 5}
    wf.write_config(jobs)
    _, out = wf.snakemake("--cores", "2")
    assert "Nothing to be done" in out


def test_n_shards_change_replans(wf):
    jobs = {"a": job("a", n_items=6, n_shards=3)}
    wf.write_config(jobs)
    wf.snakemake("--cores", "2")
    jobs["a"]["n_shards"] = 2
    wf.write_config(jobs)
    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out) == {"plan": 1, "shard": 2, "merge": 1, "all": 1}
    assert (wf.path / "results/a/text").read_text() == expected_text(6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_shards": 0}, "config: jobs.a.n_shards: 0 is less than the minimum of 1"),
        ({"n_shard": 2}, "config: jobs.a: Additional properties are not allowed ('n_shard' was unexpected)"),
        ({"runner": "wf_toy.Nope"}, "jobs.a.runner 'wf_toy.Nope': module 'wf_toy' has no attribute 'Nope'"),
        ({"runner": "wf_toy.SelfRunner"}, "SelfRunner.forward must be a @staticmethod"),
        ({"n_shards": 20}, "jobs.a: n_shards (20) exceeds the number of items (10); lower n_shards"),
    ],
)
def test_contract_errors_fail_the_dry_run(wf, change, message):
    wf.write_config({"a": job("a", **change)})
    code, out = wf.snakemake("-n", check=False)
    assert code != 0
    assert message in out


def test_default_config_runs_end_to_end_with_two_test_sets_and_metrics(wf):
    """The shipped config/config.yaml (README command 1), in a temp working directory."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    (wf.path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    wf.snakemake("--cores", "2")
    metrics = json.loads((wf.path / "results/tone_asr/decode/metrics.json").read_text())
    assert set(metrics) == {"espnet3_rules.metrics.WER", "espnet3_rules.metrics.CER"}
    for per_test in metrics.values():
        assert set(per_test) == {"tone_dev", "tone_test"}
    wer = metrics["espnet3_rules.metrics.WER"]["tone_test"]
    assert wer["utterances"] == 40 and wer["missing_hyp"] == 0
    assert 0 <= wer["WER"] < 10, "the constructed recogniser must decode the synthetic set well"
    for test in ("tone_dev", "tone_test"):
        assert (wf.path / f"results/tone_asr/decode/{test}/hyp.scp").exists()
        assert (wf.path / f"results/tone_asr/decode/{test}/dataset/text.scp").exists()
    assert (wf.path / "results/tone_asr/stats/feats_stats.npz").exists()
    _, out = wf.snakemake("--cores", "2")
    assert "Nothing to be done" in out


def test_local_gpu_shards_get_a_device(wf, monkeypatch):
    monkeypatch.setenv("ESPNET3_RULES_GPUS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    wf.write_config({
        "gpu": job("gpu", n_items=4, n_shards=2, runner="wf_toy.DeviceRunner", resources={"gpu": 1}),
        "cpu": job("cpu", n_items=2, n_shards=1, runner="wf_toy.DeviceRunner"),
    })
    wf.snakemake("--cores", "2", "--resources", "gpu=2")
    for line in (wf.path / "results/gpu/text").read_text().splitlines():
        assert line.split()[1] in ("cuda:0@0", "cuda:0@1")
    assert (wf.path / "results/cpu/text").read_text() == "0 cpu@\n1 cpu@\n"
