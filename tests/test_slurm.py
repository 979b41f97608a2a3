"""End to end on a real SLURM (scripts/slurm-cluster.sh): the documented `snakemake --profile slurm`.

Skipped where no SLURM is running (a laptop); CI installs and starts the one-node cluster first.
"""

import json
import re
import shutil
import subprocess
import time

import pytest
import yaml

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
