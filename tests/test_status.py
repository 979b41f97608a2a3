"""``split.N/attempts.json`` and ``python -m espnet3_rules status`` (issue 15).

Every run of a shard is an attempt: failed then done, a done shard rerun (a new story), a changed plan
(the old file is ignored), a SIGKILLed shard (``killed``, with its last progress) and its resumed rerun,
a shard held at an item (``running``). Shards run in this process (``toys.run_main``) or as ``run-shard``
processes (fresh ones, so the recorded pid is the process's); one test runs Snakemake.
"""

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import faults
import toys as fx
from espnet3_rules.engine.attempts import ATTEMPTS_NAME, PROGRESS_SECONDS
from espnet3_rules.engine.journal import ITEMS_ENV, JOURNAL_NAME, SECONDS_ENV
from workflow_driver import cli, job, python_env

SHARD = Path("results/t/split.0")
MANIFEST = Path("results/t/manifest.json")


def attempts(shard_dir):
    return json.loads((Path(shard_dir) / ATTEMPTS_NAME).read_text())["attempts"]


def status(*args):
    """``status ARGS --json`` in this process: ``(exit code, the one job's status)``."""
    proc = fx.run_main("status", *args, "--json", check=False)
    [job_status] = json.loads(proc.stdout)["jobs"]
    return proc.returncode, job_status


def wait_for(condition, what, proc=None, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the shard ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def probe(tmp_path):
    """A planned job of 2 shards x 3 items (ProbeTextRunner: $TOYS_FAIL_AT fails its forward)."""
    config = fx.write_config(tmp_path / "config.yaml", runner="toys.ProbeTextRunner", provider="toys.SampleProvider",
                             provider_config={"n": 6}, n_shards=2, output_dir=str(tmp_path / "out"))
    fx.run_main("plan", "--config", config, "--job", "j")
    return ("--config", config, "--job", "j")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory holding ``config.yaml`` (relative paths, as in a workflow) and ``poison/``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "poison").mkdir()
    return tmp_path


def plan_t(**extra):
    fx.write_config(Path("config.yaml"), **job("t", n_shards=1, **extra))
    fx.run_main("plan", "--config", "config.yaml", "--job", "j")


def start_shard(fault_specs=()):
    """``run-shard`` of results/t in the background, a fresh process (no fork server)."""
    env = dict(python_env(fault_specs), ESPNET3_RULES_FORKSERVER="0")
    return subprocess.Popen([sys.executable, "-m", "espnet3_rules", "run-shard", "--manifest", str(MANIFEST),
                             "--shard", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_failed_attempt_then_done_then_a_rerun_starts_a_new_story(probe, tmp_path, monkeypatch):
    shard, log = tmp_path / "out/split.1", tmp_path / "logs/split.1.log"
    monkeypatch.setenv(fx.FAIL_AT, "4")  # shard 1 holds items 3, 4, 5
    assert fx.run_main("run-shard", *probe, "--shard", 1, "--log", log, check=False).returncode == 1
    [failed] = attempts(shard)
    assert (failed["outcome"], failed["error"], failed["items_done"]) == (
        "failed", "RuntimeError: forward failed at item 4", 1)
    text = fx.run_main("status", *probe, check=False)
    assert text.returncode == 3 and text.stdout.splitlines()[1:] == [
        f"  failed  split.1: failed: {failed['error']} (attempt 1, 1/3 items); log: {log}",
        "  pending: split.0",
    ]

    monkeypatch.delenv(fx.FAIL_AT)
    fx.run_main("run-shard", *probe, "--shard", 1, "--log", log)
    first, done = attempts(shard)
    assert first == failed
    assert (done["outcome"], done["error"], done["items_done"], done["log"]) == ("done", None, 3, str(log))
    for attempt in (first, done):
        assert attempt["started"] <= attempt["ended"] and attempt["cpu_s"] >= 0 and attempt["peak_rss_mb"] > 0
        assert (attempt["host"], attempt["pid"]) == (socket.gethostname(), os.getpid())
    code, job_status = status(*probe)
    assert code == 3 and job_status["shards"][1] == {
        "shard": 1, "state": "done", "n_items": 3, "items_done": 3, "attempts": 2, "outcome": "done",
        "log": str(log), "error": None, "host": None, "pid": None, "slurm_job_id": None, "updated": None}

    fx.run_main("run-shard", *probe, "--shard", 1)
    assert [a["outcome"] for a in attempts(shard)] == ["done"], "a rerun of a done shard starts a new story"
    fx.run_main("run-shard", *probe, "--shard", 0)
    assert fx.run_main("status", *probe).stdout.strip().endswith("2 done, 0 running, 0 failed, 0 pending")


def test_a_changed_plan_ignores_the_attempts_of_the_old_one(probe, tmp_path, monkeypatch):
    monkeypatch.setenv(fx.FAIL_AT, "4")
    fx.run_main("run-shard", *probe, "--shard", 1, check=False)
    assert [shard["state"] for shard in status(*probe)[1]["shards"]] == ["pending", "failed"]

    fx.write_config(tmp_path / "config.yaml", runner="toys.ProbeTextRunner", provider="toys.SampleProvider",
                    provider_config={"n": 8}, n_shards=2, output_dir=str(tmp_path / "out"))
    fx.run_main("plan", *probe)
    assert [(shard["state"], shard["attempts"]) for shard in status(*probe)[1]["shards"]] == [("pending", 0)] * 2
    monkeypatch.delenv(fx.FAIL_AT)
    fx.run_main("run-shard", *probe, "--shard", 1)
    assert [a["outcome"] for a in attempts(tmp_path / "out/split.1")] == ["done"]


def test_unplanned_config_and_unknown_job(tmp_path):
    config = fx.write_config(tmp_path / "config.yaml", runner="toys.MyTextRunner", provider="toys.SampleProvider",
                             provider_config={"n": 3}, output_dir=str(tmp_path / "out"))
    assert status("--config", config) == (3, {
        "root": (tmp_path / "out").as_posix(), "job": "j", "test_set": None, "planned": False, "merged": False,
        "plan": "", "unit": "items", "shards": [], "counts": {"done": 0, "running": 0, "failed": 0, "pending": 0}})
    assert fx.run_main("status", "--config", config, check=False).stdout == f"{tmp_path / 'out'} (j): not planned yet\n"
    unknown = fx.run_main("status", "--config", config, "--job", "nope", check=False)
    assert (unknown.returncode, unknown.stderr) == (
        2, "espnet3_rules status: error: job 'nope' is not in the config; jobs are ['j']\n")


def test_held_shard_is_running_then_done(workdir):
    plan_t(n_items=3)
    hold = workdir / "poison/hold.0"  # item 0 waits while this file exists
    hold.touch()
    shard = start_shard()
    try:
        wait_for((workdir / "poison/started.0").exists, "item 0 to start", shard)
        [record] = attempts(SHARD)
        assert (record["outcome"], record["ended"], record["items_done"], record["resumed_at"]) == (None, None, 0, 0)
        assert (record["host"], record["pid"]) == (socket.gethostname(), shard.pid)
        text = fx.run_main("status", "--config", "config.yaml", check=False)
        assert text.returncode == 3
        assert re.fullmatch(rf"  running split\.0: 0/3 items \(host {re.escape(socket.gethostname())}, "
                            rf"pid {shard.pid}; updated \d+ s ago\)", text.stdout.splitlines()[1])
        code, job_status = status("--config", "config.yaml")
        assert code == 3 and job_status["counts"] == {"done": 0, "running": 1, "failed": 0, "pending": 0}
        assert (job_status["shards"][0]["state"], job_status["shards"][0]["pid"]) == ("running", shard.pid)

        hold.unlink()
        assert shard.wait(timeout=120) == 0, shard.stdout.read()
    finally:
        shard.kill()
    assert status("--config", "config.yaml")[1]["shards"][0]["state"] == "done"
    assert fx.run_main("status", "--config", "config.yaml").returncode == 0


def test_killed_shard_is_failed_killed_with_its_last_progress_and_its_rerun_resumes(workdir, monkeypatch):
    monkeypatch.setenv(ITEMS_ENV, "2")  # a commit every 2 items
    monkeypatch.setenv(SECONDS_ENV, "3600")
    plan_t(n_items=8, runner="toys.AppendTextRunner")
    hold = workdir / "poison/hold.0"
    hold.touch()
    shard = start_shard([faults.spec("forward", "*/t/item.5")])  # SIGKILL at item 5
    try:
        wait_for((workdir / "poison/started.0").exists, "item 0 to start", shard)
        [start] = attempts(SHARD)
        wait_for(lambda: time.time() > start["updated"] + PROGRESS_SECONDS + 0.2, "a progress write to be due")
        hold.unlink()  # item 0 (a slice of its own) finishes: a progress write; the next ones come too soon
        assert shard.wait(timeout=120) == -signal.SIGKILL, shard.stdout.read()
    finally:
        shard.kill()
    [killed] = attempts(SHARD)
    assert (killed["outcome"], killed["ended"], killed["resumed_at"], killed["items_done"]) == (None, None, 0, 1)
    assert "cpu_s" not in killed
    text = fx.run_main("status", "--config", "config.yaml", check=False)
    assert text.returncode == 3
    assert text.stdout.splitlines()[1] == "  failed  split.0: killed (attempt 1, 1/8 items); log: none"

    committed = pickle.loads((SHARD / JOURNAL_NAME).read_bytes())["n_done"]
    fx.run_main("run-shard", "--manifest", MANIFEST, "--shard", 0)
    first, resumed = attempts(SHARD)
    assert first == killed
    assert (resumed["outcome"], resumed["resumed_at"], resumed["items_done"]) == ("done", committed, 8)
    assert committed > 0
    assert fx.run_main("status", "--config", "config.yaml").returncode == 0


def test_status_after_snakemake_names_the_failed_shard_and_its_log(wf):
    wf.write_config({"t": job("t", n_items=4, n_shards=2)})
    wf.poison(3)  # shard 1 holds items 2 and 3
    assert wf.snakemake("--cores", "2", "--keep-going", check=False)[0] != 0

    shown = cli("status", "--config", "config.yaml", cwd=wf.path)
    log = "results/t/logs/split.1.log"
    assert shown.returncode == 3 and shown.stdout.splitlines() == [
        "results/t (t): 2 shards x 2 items (4 items, batch_size=None); 1 done, 0 running, 1 failed, 0 pending",
        f"  failed  split.1: failed: RuntimeError: poisoned item 3 (attempt 1, 1/2 items); log: {log}",
    ]
    assert (wf.path / log).read_text().splitlines()[-1] == (
        "espnet3_rules run-shard: error: results/t/split.1 item 3: RuntimeError: poisoned item 3")
