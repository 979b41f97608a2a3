"""Shard locks of ``runner(indices)``: ``split.N/lock`` as JSON ``{pid, host, started}`` while a shard runs.

A live owner is refused, a dead owner on this host is taken over, another host's or an unreadable lock
needs ``allow_overwrite_lock`` (ESPnet3's parallel config); Snakemake's ``run-shard`` takes no lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import toys as fx
from espnet3_rules.engine.shard import lock_path, take_shard_lock
from espnet3_rules.parallel import base_runner, parallel
from espnet3_rules.parallel.parallel import set_parallel


@pytest.fixture(autouse=True)
def no_parallel_config(monkeypatch):
    monkeypatch.setattr(parallel, "parallel_config", None)


def collect(tmp_path, output_dir="out"):
    """CollectRunner over SampleProvider(6) in ``tmp_path/out`` (2 shards), calls logged to ``tmp_path/calls``."""
    provider = fx.SampleProvider({"n": 6, "extra_env": {"calls_file": str(tmp_path / "calls")}})
    return fx.CollectRunner(provider, output_dir=tmp_path / output_dir, n_shards=2)


def locks_under(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("lock"))


def write_lock(shard_dir, text):
    shard_dir.mkdir(parents=True, exist_ok=True)
    lock_path(shard_dir).write_text(text)


def test_each_shard_is_locked_by_this_process_while_it_runs_and_unlocked_after(tmp_path, monkeypatch):
    seen = {}

    def run_shard(runner_cls, plan, shard_id, *args):
        seen[shard_id] = json.loads(lock_path(plan.shard_dir(shard_id)).read_text())
        seen[f"{shard_id} sees"] = locks_under(plan.root)
        return real_run_shard(runner_cls, plan, shard_id, *args)

    real_run_shard = base_runner.run_shard
    monkeypatch.setattr(base_runner, "run_shard", run_shard)
    collect(tmp_path)(range(6))
    assert {k: (v["pid"], v["host"]) for k, v in seen.items() if isinstance(k, int)} == {
        0: (os.getpid(), socket.gethostname()), 1: (os.getpid(), socket.gethostname())}
    assert seen["0 sees"] == ["split.0/lock", "split.1/lock"], "every pending shard is locked before any runs"
    assert seen["1 sees"] == ["split.1/lock"], "a finished shard is unlocked at once"
    assert locks_under(tmp_path) == []


def test_a_failing_shard_releases_every_lock(tmp_path, monkeypatch):
    monkeypatch.setenv(fx.FAIL_AT, "1")
    with pytest.raises(RuntimeError, match="forward failed at item 1"):
        collect(tmp_path)(range(6))
    assert locks_under(tmp_path) == []


def test_a_live_owner_is_refused_even_with_the_lock_of_one_shard_only(tmp_path):
    shard_dir = tmp_path / "out" / "split.1"
    take_shard_lock(shard_dir)  # this very process: alive
    owner = json.loads(lock_path(shard_dir).read_text())
    with pytest.raises(RuntimeError) as info:
        collect(tmp_path)(range(6))
    assert str(info.value) == (
        f"Shard is already locked by another runner: {shard_dir} (pid {os.getpid()} on host "
        f"{socket.gethostname()} since {owner['started']}); if that run is gone, set allow_overwrite_lock: true "
        "in the parallel config (set_parallel) to take the lock over")
    assert fx.read_lines(tmp_path / "calls") == [], "refused before any shard ran"
    assert locks_under(tmp_path) == ["out/split.1/lock"], "the owner's lock is left, split.0's released"


def test_the_lock_of_a_killed_runner_is_taken_over(tmp_path, caplog):
    script = "import sys, test_shard_locks as t; t.collect(t.Path(sys.argv[1]))(range(6))"
    env = {**os.environ, fx.KILL_AT: "4", "PYTHONPATH": os.pathsep.join([str(fx.REPO), str(fx.TESTS)])}
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr  # SIGKILLed at item 4, in split.1, and reaped
    held = json.loads(lock_path(tmp_path / "out" / "split.1").read_text())
    assert held["host"] == socket.gethostname() and held["pid"] != os.getpid()
    (tmp_path / "calls").write_text("")

    with caplog.at_level(logging.WARNING, logger="espnet3_rules.engine.shard"):
        result = collect(tmp_path)(range(6))
    assert [r["idx"] for r in result] == list(range(6))
    assert fx.read_lines(tmp_path / "calls") == ["3", "4", "5"], "only the killed shard is redone"
    assert f"split.1: taking over the lock of a runner that is gone (pid {held['pid']} on host" in caplog.text
    assert locks_under(tmp_path) == []


FOREIGN_LOCKS = {
    "another host": json.dumps({"pid": os.getpid(), "host": "node-elsewhere", "started": "2026-01-01T00:00:00+00:00"}),
    "unreadable (ESPnet3's bare pid)": "12345\n",
    "empty": "",
}


@pytest.mark.parametrize("text", FOREIGN_LOCKS.values(), ids=FOREIGN_LOCKS.keys())
def test_a_lock_not_provably_dead_needs_allow_overwrite_lock(tmp_path, caplog, text):
    write_lock(tmp_path / "out" / "split.0", text)
    with pytest.raises(RuntimeError, match=r"^Shard is already locked by another runner: .*split\.0 \("):
        collect(tmp_path)(range(6))
    assert lock_path(tmp_path / "out" / "split.0").read_text() == text, "a refused lock is left as it was"

    set_parallel({"env": "local", "n_workers": 1, "allow_overwrite_lock": True})
    with caplog.at_level(logging.WARNING, logger="espnet3_rules.engine.shard"):
        assert [r["idx"] for r in collect(tmp_path)(range(6))] == list(range(6))
    assert "overwriting the lock" in caplog.text and "allow_overwrite_lock is set" in caplog.text
    assert locks_under(tmp_path) == []


def test_a_done_shard_is_skipped_without_looking_at_its_lock(tmp_path):
    collect(tmp_path)(range(6))
    write_lock(tmp_path / "out" / "split.0", FOREIGN_LOCKS["another host"])
    (tmp_path / "calls").write_text("")
    (tmp_path / "out" / "split.1" / "done").unlink()
    collect(tmp_path)(range(6))
    assert fx.read_lines(tmp_path / "calls") == ["3", "4", "5"]


def test_a_shard_finished_by_another_runner_while_locking_is_not_rerun(tmp_path, monkeypatch):
    """The done check is repeated after the lock is taken (as ESPnet3's _filter_pending_shards)."""
    collect(tmp_path, output_dir="other")(range(6))
    (tmp_path / "calls").write_text("")

    def take_shard_lock(shard_dir, allow_overwrite):
        held = real_take(shard_dir, allow_overwrite)
        if shard_dir.name == "split.0":  # another runner wrote its done just before we got the lock
            for name in ("_state.pkl", "done"):
                (shard_dir / name).write_bytes((tmp_path / "other" / "split.0" / name).read_bytes())
        return held

    real_take = base_runner.take_shard_lock
    monkeypatch.setattr(base_runner, "take_shard_lock", take_shard_lock)
    assert [r["idx"] for r in collect(tmp_path)(range(6))] == list(range(6))
    assert fx.read_lines(tmp_path / "calls") == ["3", "4", "5"]
    assert locks_under(tmp_path / "out") == []


def test_snakemake_shard_jobs_take_no_lock(tmp_path):
    config = fx.write_config(tmp_path / "c.yaml", runner="toys.CollectRunner", provider="toys.SampleProvider",
                             output_dir=str(tmp_path / "out"), n_shards=2, provider_config={"n": 4})
    fx.run_main("plan", "--config", config, "--job", "j")
    write_lock(tmp_path / "out" / "split.0", FOREIGN_LOCKS["another host"])
    fx.run_main("run-shard", "--config", config, "--job", "j", "--shard", 0)
    assert (tmp_path / "out" / "split.0" / "done").exists()
    assert lock_path(tmp_path / "out" / "split.0").read_text() == FOREIGN_LOCKS["another host"]
