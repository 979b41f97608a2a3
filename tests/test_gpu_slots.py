"""Local GPU slots: concurrently running shards get distinct GPU ids (no GPU needed: ids are simulated)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from espnet3_rules import ContractError
from espnet3_rules.cli.gpu import gpu_slots, local_gpu_ids

HOLDER = """
import os, sys, time
from pathlib import Path
from espnet3_rules.cli.gpu import gpu_slots
out, n = Path(sys.argv[1]), int(sys.argv[2])
with gpu_slots(n, poll_s=0.05) as device:
    out.write_text(device + " " + os.environ["CUDA_VISIBLE_DEVICES"])
    deadline = time.monotonic() + 60  # never outlive a failed test
    while not out.with_suffix(".release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    environ = dict(os.environ, ESPNET3_RULES_GPUS="2", ESPNET3_RULES_GPU_SLOT_DIR=str(tmp_path / "slots"))
    environ.pop("CUDA_VISIBLE_DEVICES", None)
    environ.pop("SLURM_JOB_ID", None)
    return environ


def start(tmp_path, env, name, n=1):
    out = tmp_path / name
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(n)], env=env)
    return proc, out


def wait_file(path, limit_s=30):
    deadline = time.monotonic() + limit_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} not written in {limit_s} s"
        time.sleep(0.05)
    return path.read_text()


def test_concurrent_shards_get_distinct_gpus_and_a_killed_holder_frees_its_slot(tmp_path, env):
    first, out1 = start(tmp_path, env, "a")
    second, out2 = start(tmp_path, env, "b")
    ids = {wait_file(out1).split()[1], wait_file(out2).split()[1]}
    assert ids == {"0", "1"}
    assert wait_file(out1).split()[0] == "cuda:0"

    third, out3 = start(tmp_path, env, "c")
    time.sleep(1.0)  # bounded wait: the third must still be waiting for a slot
    assert not out3.exists()
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert wait_file(out3).split()[1] == wait_file(out1).split()[1], "the killed holder's GPU is reused"
    for out, proc in ((out2, second), (out3, third)):
        out.with_suffix(".release").touch()
        assert proc.wait(timeout=30) == 0


def test_two_gpu_shard_sees_both(tmp_path, env):
    proc, out = start(tmp_path, env, "a", n=2)
    assert wait_file(out) == "cuda:0 0,1"
    out.with_suffix(".release").touch()
    assert proc.wait(timeout=30) == 0


def test_cpu_and_slurm_assigned(monkeypatch, tmp_path):
    with gpu_slots(0) as device:
        assert device == "cpu"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with gpu_slots(1, slot_dir=tmp_path) as device:
        assert device == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not any(tmp_path.iterdir()), "inside a SLURM job nothing is allocated"


def test_slurm_group_job_splits_its_gpus_between_its_shards(tmp_path, env):
    """A group job bundling two 1-GPU shards holds two GPUs: each shard must get its own."""
    env.update(SLURM_JOB_ID="42", CUDA_VISIBLE_DEVICES="4,5", TMPDIR=str(tmp_path / "node_tmp"))
    del env["ESPNET3_RULES_GPU_SLOT_DIR"], env["ESPNET3_RULES_GPUS"]
    (tmp_path / "node_tmp").mkdir()
    (first, out1), (second, out2) = start(tmp_path, env, "a"), start(tmp_path, env, "b")
    assert {wait_file(out1), wait_file(out2)} == {"cuda:0 4", "cuda:0 5"}
    assert sorted(p.name for p in (tmp_path / "node_tmp/espnet3-rules-gpu-slots-42").iterdir()) == [
        "gpu4.lock", "gpu5.lock"]
    for out, proc in ((out1, first), (out2, second)):
        out.with_suffix(".release").touch()
        assert proc.wait(timeout=30) == 0


def test_slurm_job_without_the_gpus_refuses(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("ESPNET3_RULES_GPUS", "8")  # a local setting must not leak into a SLURM job
    with pytest.raises(ContractError, match=r"gpu=1 but SLURM job 42 holds 0 GPU\(s\) \(CUDA_VISIBLE_DEVICES=<unset>\)"):
        with gpu_slots(1, slot_dir=tmp_path):
            pass
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ContractError, match=r"gpu=2 but SLURM job 42 holds 1 GPU"):
        with gpu_slots(2, slot_dir=tmp_path):
            pass


def test_parent_visible_devices_are_the_pool(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("ESPNET3_RULES_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    with gpu_slots(1, slot_dir=tmp_path) as device:
        assert device == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7", "restored after the shard"


@pytest.mark.parametrize("visible, pool", [("3", ["3"]), ("", []), ("-1", []), ("2,-1,3", ["2"]), ("GPU-a1, GPU-b2", ["GPU-a1", "GPU-b2"])])
def test_parent_visible_devices_are_ids_as_cuda_reads_them(monkeypatch, visible, pool):
    monkeypatch.delenv("ESPNET3_RULES_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local_gpu_ids() == pool


def test_nvidia_smi_lists_the_pool(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'GPU 0: NVIDIA A100 (UUID: GPU-aaa)'\n"
        "echo '  MIG 1g.5gb     Device  0: (UUID: MIG-aaa)'\n"
        "echo 'GPU 1: NVIDIA A100 (UUID: GPU-bbb)'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("ESPNET3_RULES_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert local_gpu_ids() == ["0", "1"]


def test_too_many_gpus_requested(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("ESPNET3_RULES_GPUS", "1")
    with pytest.raises(ContractError, match="asks for gpu=2 but this machine offers 1 GPU"):
        with gpu_slots(2, slot_dir=tmp_path):
            pass
