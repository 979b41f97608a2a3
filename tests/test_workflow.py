"""Integration tests: the real Snakemake CLI on the project's Snakefile in temp dirs."""

import json
import re
import subprocess

import pytest

from espnet3_rules.cli.main import main as cli_main
from workflow_driver import REPO, expected_text, job, job_counts, snapshot


def test_dry_run_lists_every_shard_and_plan_summary(wf):
    wf.write_config({"a": job("a", n_items=10, n_shards=4), "b": job("b", n_items=6, n_shards=2)})
    _, out = wf.snakemake("-n")
    assert job_counts(out) == {"plan": 2, "shard": 6, "merge": 2, "job_report": 2, "all": 1}
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
    assert (root / "logs" / "split.1.log").exists() and not (root / "benchmarks").exists()
    _, out = wf.snakemake("--cores", "2")
    assert "Nothing to be done" in out


def test_failed_shard_keep_going_then_rerun_only_it(wf):
    wf.write_config({"a": job("a", n_items=12, n_shards=4)})
    wf.poison(7)  # item 7 lives in shard 2 (items 6..8)
    code, out = wf.snakemake("--cores", "2", "--keep-going", check=False)
    assert code != 0
    assert "results/a/logs/split.2.log" in out, "Snakemake must point at the failed shard's log"
    root = wf.path / "results" / "a"
    assert [(root / f"split.{i}" / "done").exists() for i in range(4)] == [True, True, False, True]
    assert not (root / "merge.done").exists() and not (root / "text").exists()

    wf.cure(7)
    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out) == {"shard": 1, "merge": 1, "job_report": 1, "all": 1}
    assert (root / "text").read_text() == expected_text(12)


def test_deleted_done_reruns_that_shard_and_merge(wf):
    wf.write_config({"a": job("a", n_items=6, n_shards=3)})
    wf.snakemake("--cores", "2")
    (wf.path / "results/a/split.1/done").unlink()
    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out) == {"shard": 1, "merge": 1, "job_report": 1, "all": 1}


def done_mtimes(root, n_shards):
    """``mtime_ns`` of every ``split.N/done`` and of ``merge.done`` of one job."""
    return [(root / f"split.{i}" / "done").stat().st_mtime_ns for i in range(n_shards)] + [
        (root / "merge.done").stat().st_mtime_ns
    ]


def test_runner_option_reaches_every_shard_and_the_merge_and_a_change_reruns_only_that_job(wf):
    """A runner's own constructor option (``runner_kwargs``), then a provider_config change: each
    reruns exactly its job (plan, every shard, merge), never the other job."""
    jobs = {
        "a": job("a", n_items=6, n_shards=3, runner="toys.SuffixRunner", runner_kwargs={"suffix": "x"}),
        "b": job("b", n_items=4, n_shards=2),
    }
    wf.write_config(jobs)
    wf.snakemake("--cores", "2")
    a, b = wf.path / "results/a", wf.path / "results/b"

    def check_suffix(suffix):
        shard_texts = [(a / f"split.{i}" / "text").read_text() for i in range(3)]
        assert shard_texts == ["".join(f"{i} W{i:04d}{suffix}\n" for i in items) for items in ([0, 1], [2, 3], [4, 5])]
        assert (a / "text").read_text() == "".join(shard_texts)
        assert json.loads((a / "merge.done").read_text())["result"] == {"lines": 6, "suffix": suffix}

    check_suffix("x")
    b_before = done_mtimes(b, 2)

    jobs["a"]["runner_kwargs"] = {"suffix": "y"}
    wf.write_config(jobs)
    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out) == {"plan": 1, "shard": 3, "merge": 1, "job_report": 1, "all": 1}
    check_suffix("y")
    assert done_mtimes(b, 2) == b_before, "job b must not rerun"
    a_before = done_mtimes(a, 3)

    jobs["b"]["provider_config"]["suffix"] = "x"
    wf.write_config(jobs)
    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out) == {"plan": 1, "shard": 2, "merge": 1, "job_report": 1, "all": 1}
    assert (b / "text").read_text() == expected_text(4, "x")
    assert done_mtimes(a, 3) == a_before, "job a must not rerun"
    check_suffix("y")


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
    assert job_counts(out) == {"plan": 1, "shard": 2, "merge": 1, "job_report": 1, "all": 1}
    assert (wf.path / "results/a/text").read_text() == expected_text(6)


def test_dry_run_builds_no_provider_env_or_model(wf, snakemake_server, monkeypatch):
    """``snakemake -n`` constructs no provider and calls none of its builders; the plan rule does."""
    markers = wf.path / "markers"
    markers.mkdir()
    marking = job("m", n_items=4, n_shards=2, provider="toys.MarkingProvider")
    marking["provider_config"]["marker_dir"] = str(markers)
    del marking["items"]  # counted by the plan rule, from the provider's env
    wf.write_config({
        "m": marking,
        "n": {
            "runner": "espnet3_rules.InferenceRunner",
            "provider": "toys.NoModelProvider",
            "provider_config": {"n_items": 5, "marker_dir": str(markers)},
            "runner_kwargs": {"input_key": "text", "output_fn": "toys.hyp_fields"},
            "output_dir": "results",
            "shard_subdir": "n",
            "n_shards": 2,
        },
    })
    before = snapshot(wf.path)

    _, out = wf.snakemake("-n", server=snakemake_server)

    assert "espnet3-rules plan: job m (results/m): 2 shards; items counted when plan runs" in out
    assert "espnet3-rules plan: job n (results/n): 2 shards x 2-3 items (5 items, batch_size=None)" in out
    assert job_counts(out) == {"plan": 2, "shard": 4, "merge": 2, "job_report": 2, "all": 1}
    assert snapshot(wf.path) == before, "no marker, nothing written"

    monkeypatch.chdir(wf.path)
    for name in ("m", "n"):  # the plan rule's command builds the provider (and m's env), never n's model
        assert cli_main(["plan", "--config", "config.yaml", "--job", name]) == 0
    assert sorted(p.name for p in markers.iterdir()) == ["build_env_local", "build_worker_setup_fn", "init", "setup"]


def test_default_config_runs_end_to_end_with_two_test_sets_and_metrics(default_job):
    """The shipped config/config.yaml (README command 1), in a temp working directory."""
    wf = default_job
    metrics = json.loads((wf.path / "results/tone_asr/decode/metrics.json").read_text())
    wer, cer = "espnet3_rules.systems.esp2_asr.metrics.wer.WER", "espnet3_rules.systems.esp2_asr.metrics.cer.CER"
    assert list(metrics) == [wer, cer]
    # ESPnet3's shape {class path: {test: {"WER": x}}}; the constructed recogniser decodes the synthetic sets well
    assert metrics[wer] == {"tone_dev": {"WER": 2.19}, "tone_test": {"WER": 3.4}}
    assert set(metrics[cer]) == {"tone_dev", "tone_test"}
    assert (wf.path / "results/tone_asr/decode/tone_test/wer_alignment").is_file()
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
        "gpu": job("gpu", n_items=4, n_shards=2, runner="toys.DeviceTextRunner", resources={"gpu": 1}),
        "cpu": job("cpu", n_items=2, n_shards=1, runner="toys.DeviceTextRunner"),
    })
    wf.snakemake("--cores", "2", "--resources", "gpu=2")
    for line in (wf.path / "results/gpu/text").read_text().splitlines():
        assert line.split()[1] in ("cuda:0@0", "cuda:0@1")
    assert (wf.path / "results/cpu/text").read_text() == "0 cpu@\n1 cpu@\n"


def test_repo_tracks_no_generated_files():
    proc = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout")
    tracked = proc.stdout.splitlines()
    assert "Snakefile" in tracked
    generated = re.compile(r"(^|/)(logs|results|\.snakemake|__pycache__)/|\.(log|pyc)$")
    assert [path for path in tracked if generated.search(path)] == []
