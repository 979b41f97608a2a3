"""Shards that resume mid-way (issue 14): kill a shard at item k, rerun, get a clean run's bytes.

A ``run-shard`` process is SIGKILLed (tests/faults.py) at several items and mid-write; the rerun
runs in this process, counting the items it computes again. Only the runners whose writers can
resume continue (InferenceRunner, the default records hooks, own state hooks, the append-mode
opt-in); other writers and a changed plan restart from item 0. SIGTERM commits and exits 143.
"""

import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import faults
import toys
from espnet3_rules.cli import main as espnet3_cli
from espnet3_rules.engine.job import build_runner
from espnet3_rules.engine.journal import ITEMS_ENV, JOURNAL_NAME, SECONDS_ENV
from espnet3_rules.engine.plan import read_manifest
from workflow_driver import cli, inference_job, job, python_env, snapshot

N_ITEMS = 8
EVERY = 2  # items per commit


def text_job(runner="toys.AppendTextRunner", **extra):
    return job("t", n_items=N_ITEMS, n_shards=1, runner=runner, **extra)


JOBS = {
    "append": text_job(),
    "records": text_job("toys.RecordsRunner"),
    "state": text_job("toys.SumStateRunner"),
    "inference": inference_job("t", N_ITEMS, 1),
    "no-opt-in": text_job("toys.PoisonTextRunner"),
}
SHARD = Path("results/t/split.0")
MANIFEST = Path("results/t/manifest.json")


def run(*args):
    assert espnet3_cli.main([str(a) for a in args]) == 0


def shard_files(root):
    """The shard's files but ``done`` (it holds the pid), which must be there; ``_state.pkl`` unpickled
    (pickle's bytes also tell which equal strings were one object: restored records share fewer)."""
    files = {name: data for name, data in snapshot(root / SHARD).items() if name != "done"}
    files["_state.pkl"] = pickle.loads(files["_state.pkl"])
    assert (root / SHARD / "done").exists()
    return files


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ITEMS_ENV, str(EVERY))
    monkeypatch.setenv(SECONDS_ENV, "3600")
    return tmp_path


def start(workdir, entry):
    (workdir / "config.yaml").write_text(yaml.safe_dump({"jobs": {"t": entry}}), encoding="utf-8")
    run("plan", "--config", "config.yaml", "--job", "t")


def forward_counter(monkeypatch, entry):
    """Count the items computed in this process from now on (the runner's forward, or output_fn)."""
    calls = []
    if entry["runner"].endswith("InferenceRunner"):
        real = toys.hyp_fields
        monkeypatch.setattr(toys, "hyp_fields", lambda **kw: calls.append(kw["idx"]) or real(**kw))
    else:
        cls = getattr(toys, entry["runner"].split(".")[-1])
        real = cls.forward
        monkeypatch.setattr(cls, "forward", staticmethod(lambda idx, *a, **kw: calls.append(idx) or real(idx, *a, **kw)))
    return calls


def committed_items():
    data = pickle.loads((SHARD / JOURNAL_NAME).read_bytes()) if (SHARD / JOURNAL_NAME).exists() else {}
    return data.get("n_done", 0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each job's shard files from a run without faults."""
    files = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, entry in JOBS.items():
            path = tmp_path_factory.mktemp(f"clean-{name}")
            mp.chdir(path)
            start(path, entry)
            run("run-shard", "--manifest", MANIFEST, "--shard", 0)
            files[name] = shard_files(path)
    return files


def kill_spec(name, k):
    """SIGKILL before item k is computed (InferenceRunner: in its output_fn)."""
    if name == "inference":
        return faults.spec("output_fn", f"item.{k}")
    return faults.spec("forward", f"*/t/item.{k}")


RESUMING = [(name, k) for name in ("append", "records", "state", "inference") for k in (1, 4, 7)]


@pytest.mark.parametrize("name, k", RESUMING, ids=[f"{n}-at-{k}" for n, k in RESUMING])
def test_killed_shard_resumes_at_its_last_commit_and_ends_byte_identical(name, k, reference, workdir, monkeypatch):
    start(workdir, JOBS[name])
    killed = cli("run-shard", "--manifest", MANIFEST, "--shard", 0, cwd=workdir, fault_specs=[kill_spec(name, k)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed = committed_items()
    assert k - EVERY <= committed <= k  # computed before the kill: items 0..k-1

    calls = forward_counter(monkeypatch, JOBS[name])
    run("run-shard", "--manifest", MANIFEST, "--shard", 0)

    assert calls == list(range(committed, N_ITEMS)), "the rerun starts at the first uncommitted item"
    assert k - committed <= EVERY, "items computed again: those since the last commit"
    assert shard_files(workdir) == reference[name]


@pytest.mark.parametrize("nth", [3, 6])
def test_shard_killed_mid_write_is_cut_back_to_its_commit(nth, reference, workdir, monkeypatch):
    start(workdir, JOBS["append"])
    torn = faults.spec("write_record", "*/t/split.0/text", nth)  # half of line nth reaches the file
    assert cli("run-shard", "--manifest", MANIFEST, "--shard", 0, cwd=workdir, fault_specs=[torn]).returncode < 0
    committed = committed_items()
    assert committed < nth  # 3: before the first commit (the torn file is cut to nothing)

    calls = forward_counter(monkeypatch, JOBS["append"])
    run("run-shard", "--manifest", MANIFEST, "--shard", 0)

    assert calls == list(range(committed, N_ITEMS))
    assert shard_files(workdir) == reference["append"]


def test_writers_without_the_opt_in_restart_from_zero(reference, workdir, monkeypatch):
    start(workdir, JOBS["no-opt-in"])
    killed = cli("run-shard", "--manifest", MANIFEST, "--shard", 0, cwd=workdir, fault_specs=[kill_spec("t", 5)])
    assert killed.returncode == -signal.SIGKILL
    assert not (SHARD / JOURNAL_NAME).exists(), "nothing is committed for writers that cannot resume"

    calls = forward_counter(monkeypatch, JOBS["no-opt-in"])
    run("run-shard", "--manifest", MANIFEST, "--shard", 0)

    assert calls == list(range(N_ITEMS))
    assert shard_files(workdir) == reference["no-opt-in"]


def test_a_changed_plan_never_resumes(workdir, monkeypatch, tmp_path_factory):
    start(workdir, JOBS["append"])
    assert cli("run-shard", "--manifest", MANIFEST, "--shard", 0, cwd=workdir,
               fault_specs=[kill_spec("t", 5)]).returncode == -signal.SIGKILL
    assert committed_items() > 0
    changed = text_job(provider_config={"n_items": N_ITEMS, "poison_dir": "poison", "suffix": "x"})
    start(workdir, changed)

    calls = forward_counter(monkeypatch, changed)
    run("run-shard", "--manifest", MANIFEST, "--shard", 0)

    assert calls == list(range(N_ITEMS))
    assert (SHARD / "text").read_text() == "".join(f"{i} W{i:04d}X\n" for i in range(N_ITEMS))


@pytest.mark.parametrize("resume", [True, False])
def test_runner_call_resumes_a_killed_shard_unless_resume_is_false(resume, reference, workdir, monkeypatch):
    start(workdir, JOBS["append"])
    assert cli("run-shard", "--manifest", MANIFEST, "--shard", 0, cwd=workdir,
               fault_specs=[kill_spec("t", 5)]).returncode == -signal.SIGKILL
    committed = committed_items()
    assert committed > 0
    runner = build_runner(read_manifest(MANIFEST).job)
    runner.resume = resume

    calls = forward_counter(monkeypatch, JOBS["append"])
    runner(range(N_ITEMS))

    assert calls == list(range(committed if resume else 0, N_ITEMS))
    assert shard_files(workdir) == reference["append"]


def test_resumable_writers_need_append_mode(workdir):
    start(workdir, text_job("toys.WriteModeTextRunner"))
    failed = cli("run-shard", "--manifest", MANIFEST, "--shard", 0, cwd=workdir)
    assert failed.returncode == 2
    assert failed.stderr.splitlines()[-1] == (
        "espnet3_rules run-shard: error: results/t/split.0 (init_state): WriteModeTextRunner.resumable_writers is "
        "set, so open_writers must open its files in append mode ('a'): results/t/split.0/text has mode 'w'"
    )


def test_finished_shard_keeps_no_journal(reference):
    for files in reference.values():
        assert not [name for name in files if name.startswith("_journal")]


@pytest.mark.parametrize("forkserver", ["1", "0"], ids=["fork-server", "fresh-process"])
def test_sigterm_commits_and_exits_143_then_the_rerun_continues(forkserver, reference, workdir, monkeypatch):
    start(workdir, JOBS["append"])
    (workdir / "poison").mkdir()
    hold = workdir / "poison/hold.5"  # item 5 waits while this file exists
    hold.touch()
    env = dict(python_env(), ESPNET3_RULES_FORKSERVER=forkserver)
    shard = subprocess.Popen([sys.executable, "-m", "espnet3_rules", "run-shard", "--manifest", str(MANIFEST),
                              "--shard", "0"], cwd=workdir, env=env, stderr=subprocess.PIPE, text=True)
    try:
        while not (workdir / "poison/started.5").exists():
            assert shard.poll() is None, shard.stderr.read()
            time.sleep(0.05)
        shard.send_signal(signal.SIGTERM)
        hold.unlink()  # item 5 finishes, then the shard stops
        stderr = shard.communicate(timeout=120)[1]
    finally:
        shard.kill()
    assert shard.returncode == 143, stderr
    committed = committed_items()
    assert 5 < committed < N_ITEMS
    assert stderr.splitlines()[-1].endswith(
        f"ShardInterrupted: stopped by signal 15 (committed {committed} of {N_ITEMS} items); rerun it to continue")
    assert not (SHARD / "done").exists()

    calls = forward_counter(monkeypatch, JOBS["append"])
    run("run-shard", "--manifest", MANIFEST, "--shard", 0)
    assert calls == list(range(committed, N_ITEMS))
    assert shard_files(workdir) == reference["append"]
