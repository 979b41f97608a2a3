"""End to end on a real SLURM (scripts/slurm-cluster.sh): the documented `snakemake --profile slurm`.

Skipped where no SLURM is running (a laptop); CI installs and starts the one-node cluster first.
"""

import json
import pickle
import re
import shutil
import subprocess
import time

import pytest
import yaml

import toys
from espnet3_rules.engine.journal import ITEMS_ENV, JOURNAL_NAME
from workflow_driver import REPO, Workflow, expected_text, job

pytestmark = pytest.mark.skipif(
    shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0,
    reason="no SLURM cluster here (run scripts/slurm-cluster.sh install && scripts/slurm-cluster.sh start)",
)

# The documented command, with test overrides: fast status checks, no retries (a scancel'd shard must fail).
SLURM = ("--profile", "slurm", "--slurm-init-seconds-before-status-checks", "1", "--retries", "0")


def slurm_job_ids(output: str):
    return re.findall(r"has been submitted with SLURM jobid (\d+)", output)


def wait_for(path, limit_s=180):
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {limit_s} s"
        time.sleep(0.5)


def test_default_job_runs_through_the_profile_one_slurm_job_per_shard(tmp_path):
    """The shipped config/config.yaml, exactly as `snakemake --profile slurm` runs it."""
    wf = Workflow(tmp_path)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    _, out = wf.snakemake(*SLURM)
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid \d+ \(log: \S*/slurm_logs/rule_(\w+)/", out)
    assert submitted.count("shard") == 11, out  # 3 + 3 decode, 2 feats, 3 stats
    assert submitted.count("example_data") == 2
    for rule in ("plan", "merge", "measure"):
        assert f"localrule {rule}:" in out, f"{rule} must stay local"
    metrics = json.loads((tmp_path / "results/tone_asr/decode/metrics.json").read_text())
    assert set(metrics["espnet3_rules.systems.esp2_asr.metrics.wer.WER"]) == {"tone_dev", "tone_test"}


def test_profile_runs_each_shard_as_a_slurm_job_and_reruns_a_cancelled_one(tmp_path):
    wf = Workflow(tmp_path)
    wf.write_config({"a": job("a", n_items=8, n_shards=4, resources={"mem_mb": 500, "runtime": 10})})
    (tmp_path / "poison" / "hold.5").touch()  # item 5 lives in shard 2 (items 4..5): it waits there
    cmd, env = wf.command(*SLURM, "--keep-going")
    first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started = tmp_path / "poison" / "started.5"
        wait_for(started)
        slurm_id = started.read_text().strip()
        assert slurm_id, "the held shard must run inside a SLURM job (SLURM_JOB_ID set)"
        subprocess.run(["scancel", slurm_id], check=True)
        out, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0
    assert len(slurm_job_ids(out)) == 4, out
    assert slurm_id in slurm_job_ids(out)
    assert re.search(r"Error in rule shard:.*?results/a/split\.2/done", out, re.S), out
    root = tmp_path / "results" / "a"
    assert [(root / f"split.{i}" / "done").exists() for i in range(4)] == [True, True, False, True]
    assert not (root / "merge.done").exists()

    (tmp_path / "poison" / "hold.5").unlink()
    _, out = wf.snakemake(*SLURM)
    assert len(slurm_job_ids(out)) == 1, "only the cancelled shard is submitted again"
    assert "localrule merge:" in out, "the merge runs locally"
    assert (root / "text").read_text() == expected_text(8)



def test_grouped_shards_run_as_fewer_slurm_jobs(tmp_path):
    wf = Workflow(tmp_path)
    wf.write_config({"a": job("a", n_items=8, n_shards=4, resources={"mem_mb": 500, "runtime": 10, "group": "decode"})})
    _, out = wf.snakemake(*SLURM, "--group-components", "decode=2")
    assert len(slurm_job_ids(out)) == 2, "4 shards in groups of 2: two SLURM jobs"
    assert (tmp_path / "results/a/text").read_text() == expected_text(8)


# SIGTERM on SLURM (issue 14): a slow one-shard job; its shard commits every 2 items.
SLOW_ITEMS = 16


@pytest.fixture
def slow_job(tmp_path, monkeypatch):
    """A Workflow whose one shard takes 0.5 s per item and traces each item it computes."""
    monkeypatch.setenv(ITEMS_ENV, "2")
    monkeypatch.setenv(toys.ITEM_SLEEP_S, "0.5")
    wf = Workflow(tmp_path)
    wf.write_config({"a": job("a", n_items=SLOW_ITEMS, n_shards=1, runner="toys.SlowAppendTextRunner",
                              resources={"mem_mb": 500, "runtime": 10})})
    return wf


def computed(wf):
    """``(item, SLURM job id)`` of each item the shard computed, in order."""
    lines = (wf.path / "poison" / "computed").read_text().splitlines()
    return [(int(item), slurm_id) for item, slurm_id in map(str.split, lines)]


def committed(wf):
    journal = wf.path / "results/a/split.0" / JOURNAL_NAME
    return pickle.loads(journal.read_bytes())["n_done"] if journal.exists() else 0


def signal_mid_shard(wf, signal_args, *args):
    """Run snakemake; once the shard committed 4 items, ``scancel SIGNAL_ARGS`` its SLURM job.

    Returns the SLURM job id, snakemake's exit code and output.
    """
    proc = wf.start(*SLURM, *args)
    try:
        deadline = time.monotonic() + 180
        while committed(wf) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        slurm_id = computed(wf)[0][1]
        subprocess.run(["scancel", *signal_args, slurm_id], check=True)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return slurm_id, proc.returncode, out


def test_scancelled_shard_commits_and_the_next_run_computes_only_the_rest(slow_job):
    """Plain scancel: SIGTERM to the job's steps (the shard runs in one, exec'ed by the rule's shell)."""
    wf = slow_job
    slurm_id, code, out = signal_mid_shard(wf, [])
    assert code != 0
    assert re.search(rf"Error in rule shard:\s+message: SLURM-job '{slurm_id}' failed, SLURM status is: 'CANCELLED'", out), out
    kept = committed(wf)
    assert [item for item, _ in computed(wf)] == list(range(kept)), "every item computed before the stop is committed"
    assert 4 <= kept < SLOW_ITEMS
    stop = (wf.path / "results/a/logs/split.0.log").read_text().splitlines()[-1]
    assert f"stopped by signal 15 (committed {kept} of {SLOW_ITEMS} items)" in stop
    assert not (wf.path / "results/a/split.0/done").exists()

    _, out = wf.snakemake(*SLURM)
    assert len(slurm_job_ids(out)) == 1
    rerun = [item for item, job_id in computed(wf) if job_id != slurm_id]
    assert rerun == list(range(kept, SLOW_ITEMS)), "the rerun starts at the first uncommitted item"
    assert (wf.path / "results/a/text").read_text() == expected_text(SLOW_ITEMS)


def test_warning_signal_stops_the_shard_and_a_retry_continues_it(slow_job):
    """``scancel --signal=TERM`` signals the job's steps as ``--signal=TERM@N`` does before the time
    limit (the job goes on): the shard stops, its job fails, ``--retries`` resubmits it, it resumes."""
    wf = slow_job
    slurm_id, code, out = signal_mid_shard(wf, ["--signal=TERM"], "--retries", "1")
    assert code == 0, out
    jobs = slurm_job_ids(out)
    assert len(jobs) == 2 and jobs[0] == slurm_id, out
    assert re.search(rf"Error in rule shard:\s+message: SLURM-job '{slurm_id}' failed, SLURM status is: 'FAILED'", out), out
    by_job = {job_id: [item for item, j in computed(wf) if j == job_id] for job_id in jobs}
    kept = len(by_job[jobs[0]])
    assert kept >= 4 and by_job == {jobs[0]: list(range(kept)), jobs[1]: list(range(kept, SLOW_ITEMS))}, by_job
    assert (wf.path / "results/a/text").read_text() == expected_text(SLOW_ITEMS)
