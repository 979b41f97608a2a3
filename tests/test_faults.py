"""Fault injection (issue 6): nothing finished is lost, nothing wrong is merged.

A plan, shard or merge process is SIGKILLed at many points (tests/faults.py); ``done`` files are
torn or come from another plan; two ``snakemake`` runs share a directory; Snakemake itself is
killed; the disk fills up or turns read-only. After the fault, a rerun gives merged outputs
byte-identical to a clean run's. Most kill points drive the CLI the rules call (one process
killed, the rerun done in-process the way Snakemake would); a handful run end to end.
"""

import base64
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import faults
from espnet3_rules.cli import main as espnet3_cli
from espnet3_rules.engine.merge import MERGE_DONE_NAME, pending_shards
from espnet3_rules.engine.plan import read_manifest
from workflow_driver import assert_kept, cli, expected_text, inference_job, job, job_counts, snapshot


# 9 items in 3 shards: shard 1 holds items 3, 4, 5.
JOBS = {"t": job("t", n_items=9, n_shards=3), "u": inference_job("u", n_items=9, n_shards=3)}


def write_config(path, jobs):
    (path / "config.yaml").write_text(yaml.safe_dump({"jobs": jobs}, allow_unicode=True), encoding="utf-8")


def root_of(entry):
    return Path(entry["output_dir"], entry["shard_subdir"])


def merged_files(entry):
    """The merged outputs of a job: PoisonTextRunner's text, or the InferenceRunner fields."""
    return ["hyp.scp", "n_chars.scp"] if entry["runner"].endswith("InferenceRunner") else ["text"]


def merged_outputs(path, entry):
    """Merged output name -> bytes (``None`` if absent)."""
    root = path / root_of(entry)
    return {name: (root / name).read_bytes() if (root / name).exists() else None for name in merged_files(entry)}


# ---------------------------------------------- the CLI, in-process (cwd: the working directory)
def run(*args):
    """``python -m espnet3_rules ARGS`` in this process; must succeed."""
    assert espnet3_cli.main([str(a) for a in args]) == 0


def manifest_of(name, jobs=JOBS):
    return root_of(jobs[name]) / "manifest.json"


def rerun(name, jobs=JOBS):
    """What a plain ``snakemake`` rerun does for one job: plan if needed, every pending shard, merge."""
    manifest = manifest_of(name, jobs)
    if not manifest.exists():
        run("plan", "--config", "config.yaml", "--job", name)
    plan = read_manifest(manifest)
    for shard in pending_shards(plan):
        run("run-shard", "--manifest", manifest, "--shard", shard)
    merge_done = plan.root / MERGE_DONE_NAME
    if not merge_done.exists() or json.loads(merge_done.read_text())["fingerprint"] != plan.fingerprint:
        run("merge", "--manifest", manifest)


def clean_run(path, jobs):
    """Merged outputs of every job, run without faults in ``path``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        write_config(path, jobs)
        for name in jobs:
            rerun(name, jobs)
    return {name: merged_outputs(path, entry) for name, entry in jobs.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    outputs = clean_run(tmp_path_factory.mktemp("clean"), JOBS)
    assert outputs["t"]["text"] == expected_text(9).encode()
    assert [line.split()[0] for line in outputs["u"]["hyp.scp"].decode().splitlines()] == [f"utt{i}" for i in range(9)]
    return outputs


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, JOBS)
    return tmp_path


# ------------------------------------------------------------------------------ kill points
@dataclass
class KillPoint:
    """SIGKILL the ``step`` process of job ``name`` at the ``nth`` call of ``point`` on ``glob``.

    ``prior``: the step had completed once before (a re-plan, a rerun shard, a re-merge).
    ``survives``: the kill comes after the step's marker was renamed into place, so it stays valid.
    """

    name: str
    step: str
    point: str
    glob: str
    nth: int = 1
    prior: bool = False
    survives: bool = False

    def __str__(self):
        return f"{self.step}-{self.name}-{self.point}-{Path(self.glob).name}-{self.nth}{'-prior' if self.prior else ''}"

    def command(self):
        manifest = manifest_of(self.name)
        return {
            "plan": ["plan", "--config", "config.yaml", "--job", self.name],
            "shard": ["run-shard", "--manifest", manifest, "--shard", 1],
            "merge": ["merge", "--manifest", manifest],
        }[self.step]

    def prepare(self):
        """The finished work before the fault: shards 0 and 2 for a shard step, all shards for a merge."""
        manifest = manifest_of(self.name)
        if self.step != "plan" or self.prior:
            run("plan", "--config", "config.yaml", "--job", self.name)
        shards = {"plan": [], "shard": [0, 2] + [1] * self.prior, "merge": [0, 1, 2]}[self.step]
        for shard in shards:
            run("run-shard", "--manifest", manifest, "--shard", shard)
        if self.step == "merge" and self.prior:
            run("merge", "--manifest", manifest)

    def rewritten(self):
        """Paths the killed step may rewrite (everything else must survive byte for byte)."""
        root = root_of(JOBS[self.name]).as_posix()
        return {
            "plan": [],
            "shard": [f"{root}/split.1/"],
            "merge": [f"{root}/{name}" for name in [*merged_files(JOBS[self.name]), MERGE_DONE_NAME]],
        }[self.step]


KILL_POINTS = [
    # shard 1 of the writer-hook PoisonTextRunner job; shards 0 and 2 are done
    KillPoint("t", "shard", "open_writers", "*/t/split.1"),
    KillPoint("t", "shard", "forward", "*/t/item.3"),
    KillPoint("t", "shard", "forward", "*/t/item.5"),
    KillPoint("t", "shard", "write_record", "*/t/split.1/text", 1),
    KillPoint("t", "shard", "write_record", "*/t/split.1/text", 3),
    KillPoint("t", "shard", "close_writers", "*/t/split.1"),
    KillPoint("t", "shard", "replace", "*/t/split.1/_state.pkl"),
    KillPoint("t", "shard", "replaced", "*/t/split.1/_state.pkl"),
    KillPoint("t", "shard", "write_text", "*/t/split.1/done"),
    KillPoint("t", "shard", "replace", "*/t/split.1/done"),
    KillPoint("t", "shard", "replaced", "*/t/split.1/done", survives=True),
    KillPoint("t", "shard", "forward", "*/t/item.4", prior=True),
    # shard 1 of the InferenceRunner job
    KillPoint("u", "shard", "output_fn", "item.4"),
    KillPoint("u", "shard", "replace", "*/u/split.1/field_keys.txt"),
    KillPoint("u", "shard", "write_text", "*/u/split.1/done"),
    # the plan, with and without a manifest from before
    KillPoint("t", "plan", "write_text", "*/t/manifest.json"),
    KillPoint("t", "plan", "write_text", "*/t/manifest.json", prior=True),
    KillPoint("t", "plan", "replace", "*/t/manifest.json", prior=True),
    # the merge: the toy's own (non-atomic) writer, then InferenceRunner's atomic concatenation
    KillPoint("t", "merge", "merge", "*/t/text", 2),
    KillPoint("t", "merge", "write_text", "*/t/merge.done"),
    KillPoint("u", "merge", "copy", "*/u/hyp.scp", 1),
    KillPoint("u", "merge", "copy", "*/u/hyp.scp", 3),
    KillPoint("u", "merge", "replace", "*/u/hyp.scp"),
    KillPoint("u", "merge", "replace", "*/u/n_chars.scp"),
    KillPoint("u", "merge", "copy", "*/u/n_chars.scp", 2, prior=True),
    KillPoint("u", "merge", "replace", "*/u/merge.done"),
    KillPoint("u", "merge", "replaced", "*/u/merge.done", survives=True),
]


@pytest.mark.parametrize("kill", KILL_POINTS, ids=str)
def test_killed_step_loses_nothing_and_rerun_is_byte_identical(kill, reference, workdir):
    kill.prepare()
    before = snapshot(workdir)
    manifest = manifest_of(kill.name)
    prior_manifest = manifest.read_bytes() if manifest.exists() else None

    killed = cli(*kill.command(), cwd=workdir, fault_specs=[faults.spec(kill.point, kill.glob, kill.nth)])

    assert killed.returncode == -signal.SIGKILL, f"the fault point was not reached:\n{killed.stderr}"
    assert_kept({k: v for k, v in before.items() if not k.startswith(tuple(kill.rewritten()))}, workdir)
    plan = read_manifest(manifest) if manifest.exists() else None
    if kill.step == "plan":  # never half a manifest: the old one, or none
        assert (manifest.read_bytes() if manifest.exists() else None) == prior_manifest
    elif kill.step == "shard":
        assert pending_shards(plan) == ([] if kill.survives else [1])
    else:
        merge_done = plan.root / MERGE_DONE_NAME
        assert merge_done.exists() == kill.survives
        if kill.name == "u":  # InferenceRunner's merged files are whole or absent, never torn
            merged = merged_outputs(workdir, JOBS["u"])
            assert all(data in (None, reference["u"][name]) for name, data in merged.items())

    rerun(kill.name)
    assert merged_outputs(workdir, JOBS[kill.name]) == reference[kill.name]


# ------------------------------------------------------------------- torn and foreign done
UNTRUSTED_DONES = [
    ("empty", b"", "torn done"),
    ("truncated", b'{"fingerprint": "0a1b', "torn done"),
    ("garbage", b"\xff\xfe\x00garbage", "torn done"),
    ("not-a-record", b"[1, 2]\n", "torn done"),
    ("no-fingerprint", b'{"shard_id": 1, "n_items": 3}\n', "stale (done from another plan)"),
    ("another-plan", None, "stale (done from another plan)"),
]


@pytest.mark.parametrize("content, label", [c[1:] for c in UNTRUSTED_DONES], ids=[c[0] for c in UNTRUSTED_DONES])
def test_untrusted_done_is_never_merged_and_a_rerun_redoes_it(content, label, reference, workdir):
    shard_dir = workdir / "results/t/split.1"
    if content is None:  # split.1 as another plan (another provider_config) left it
        other = {"t": job("t", n_items=9, n_shards=3, provider_config={"n_items": 9, "suffix": "x"})}
        other_dir = workdir / "other"
        other_dir.mkdir()
        clean_run(other_dir, other)
        shutil.copytree(other_dir / "results/t/split.1", shard_dir)
        content = (shard_dir / "done").read_bytes()
    run("plan", "--config", "config.yaml", "--job", "t")
    for shard in (0, 2):
        run("run-shard", "--manifest", manifest_of("t"), "--shard", shard)
    shard_dir.mkdir(exist_ok=True)
    (shard_dir / "done").write_bytes(content)

    assert cli("status", "--manifest", manifest_of("t"), cwd=workdir).returncode == 3
    merge = cli("merge", "--manifest", manifest_of("t"), cwd=workdir)

    assert merge.returncode == 2
    assert merge.stderr.splitlines() == [
        f"espnet3_rules merge: error: cannot merge results/t: shards {label}: split.1; run those shards first "
        "(untrusted done renamed to done.rejected, so the next snakemake run redoes them)"
    ]
    assert not (workdir / "results/t/text").exists() and not (workdir / "results/t/merge.done").exists()
    assert not (shard_dir / "done").exists() and (shard_dir / "done.rejected").read_bytes() == content
    rerun("t")
    assert merged_outputs(workdir, JOBS["t"]) == reference["t"]


# ---------------------------------------------------------------------------- end to end
E2E_JOBS = {
    "a": job("a", n_items=6, n_shards=2),
    "spaced": job("b ü", n_items=6, n_shards=2, output_dir="my results"),
    "c": inference_job("c", n_items=6, n_shards=2),
    "d": job("d", n_items=4, n_shards=2),
    "e": job("e", n_items=4, n_shards=2),
}
E2E_FAULTS = [
    faults.spec("write_record", "results/a/split.0/text", 2),  # torn line mid-shard
    faults.spec("write_text", "results/a/split.1/done"),  # torn done
    faults.spec("open_writers", "my results/b ü/split.0"),  # before writers open
    faults.spec("replaced", "my results/b ü/split.1/done"),  # after done is in place
    faults.spec("copy", "results/c/hyp.scp", 2),  # mid-concatenation
    faults.spec("write_text", "results/d/manifest.json"),  # torn manifest
    faults.spec("merge", "results/e/text", 2),  # mid (non-atomic) user merge
]


def test_end_to_end_kills_then_a_plain_rerun_is_byte_identical(wf, tmp_path_factory):
    reference = clean_run(tmp_path_factory.mktemp("clean_e2e"), E2E_JOBS)
    wf.write_config(E2E_JOBS)

    code, out = wf.snakemake("--cores", "2", "--keep-going", check=False, fault_specs=E2E_FAULTS)

    assert code != 0
    # a shell's status 137, or the shard's own SIGKILL (the shard rule execs it)
    killed = out.count("returned non-zero exit status 137") + out.count("died with <Signals.SIGKILL: 9>")
    assert killed == len(E2E_FAULTS), "every fault must strike"
    done = {path.relative_to(wf.path).as_posix() for path in wf.path.rglob("done")}
    assert done == {"results/c/split.0/done", "results/c/split.1/done", "results/e/split.0/done",
                    "results/e/split.1/done"}, "Snakemake removes the done of a killed shard job"
    assert not (wf.path / "results/c/hyp.scp").exists() and not (wf.path / "results/d/manifest.json").exists()
    assert not list(wf.path.rglob(MERGE_DONE_NAME))

    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out) == {"plan": 1, "shard": 6, "merge": 5, "job_report": 5, "all": 1}, "finished shards are not redone"
    assert {name: merged_outputs(wf.path, entry) for name, entry in E2E_JOBS.items()} == reference


def test_torn_done_under_snakemake_fails_the_merge_then_a_plain_rerun_heals(wf):
    wf.write_config({"a": job("a", n_items=4, n_shards=2)})
    wf.snakemake("--cores", "2")
    torn = b'{"fingerprint": "3f'
    (wf.path / "results/a/split.1/done").write_bytes(torn)  # newer than merge.done

    code, out = wf.snakemake("--cores", "2", check=False)
    assert code != 0 and "results/a/logs/merge.log" in out
    last = (wf.path / "results/a/logs/merge.log").read_text().splitlines()[-1]
    assert last.startswith("espnet3_rules merge: error: ")  # the message: test_untrusted_done_is_never_merged...
    assert not (wf.path / "results/a/split.1/done").exists(), "set aside, so Snakemake sees the shard as not done"
    assert (wf.path / "results/a/split.1/done.rejected").read_bytes() == torn

    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out) == {"shard": 1, "merge": 1, "job_report": 1, "all": 1}
    assert (wf.path / "results/a/text").read_text() == expected_text(4)


def wait_for(condition, what, timeout=120):
    """Poll ``condition`` (bounded; no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_second_snakemake_on_the_same_directory_is_refused(wf):
    wf.write_config({"a": job("a", n_items=4, n_shards=2)})
    hold = wf.path / "poison/hold.0"  # shard 0 waits at item 0 while this file exists
    hold.touch()
    first = wf.start("--cores", "1")
    try:
        wait_for(lambda: (wf.path / "poison/started.0").exists(), "the first run's shard 0 to start")
        assert os.listdir(wf.path / ".snakemake/locks"), "the first run holds Snakemake's lock"
        before = {k: v for k, v in snapshot(wf.path).items() if "/logs/" not in k}  # the held shard's log may grow

        code, out = wf.snakemake("--cores", "2", check=False)

        assert code == 1
        assert "LockException" in out and "Directory cannot be locked" in out
        assert_kept(before, wf.path)
    finally:
        hold.unlink()
        first_out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, first_out
    assert (wf.path / "results/a/text").read_text() == expected_text(4)


def test_killed_snakemake_keeps_finished_shards(wf):
    wf.write_config({"a": job("a", n_items=6, n_shards=3)})
    (wf.path / "poison/hold.2").touch()  # shard 1 (items 2, 3) waits while this file exists
    incomplete = wf.path / ".snakemake/incomplete"
    running = base64.b64encode(b"results/a/split.1/done").decode()
    first = wf.start("--cores", "2", start_new_session=True)
    try:
        wait_for(lambda: (wf.path / "poison/started.2").exists() and all(
            (wf.path / f"results/a/split.{i}/done").exists() for i in (0, 2)), "shards 0 and 2 to finish")
        wait_for(lambda: os.listdir(incomplete) == [running], "Snakemake to register shards 0 and 2")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # Snakemake and its jobs, as when the node dies
        first.communicate(timeout=60)
    (wf.path / "poison/hold.2").unlink()
    finished = snapshot(wf.path)

    wf.snakemake("--unlock")  # the lock of the killed run stays behind (Snakemake cannot tell it is stale)
    _, out = wf.snakemake("--cores", "2")

    assert job_counts(out) == {"shard": 1, "merge": 1, "job_report": 1, "all": 1}
    assert (wf.path / "results/a/text").read_text() == expected_text(6)
    assert_kept({k: v for k, v in finished.items() if "split.1" not in k}, wf.path)  # split.1: dir, log


# ----------------------------------------------------------------- full or read-only disk
def mount_tmpfs(path, size="64k"):
    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


def fill(directory):
    """Write a ballast file until the filesystem is full."""
    with open(directory / "ballast", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.mark.parametrize("fault", ["disk-full", "file-size-limit", "read-only"])
def test_full_or_read_only_disk_fails_clearly_and_keeps_earlier_shards(fault, reference, workdir):
    results = workdir / "results"
    if fault != "file-size-limit":
        mount_tmpfs(results)
    try:
        run("plan", "--config", "config.yaml", "--job", "t")
        for shard in (0, 2):
            run("run-shard", "--manifest", manifest_of("t"), "--shard", shard)
        before = snapshot(workdir)
        limit = {}
        if fault == "disk-full":
            fill(results)
        elif fault == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(results)], check=True)
        else:
            limit["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8, 8))

        failed = cli("run-shard", "--manifest", manifest_of("t"), "--shard", 1, cwd=workdir, **limit)

        assert failed.returncode == 1
        expected = {
            "disk-full": "results/t/split.1 (finalize_state): OSError: [Errno 28] No space left on device",
            "file-size-limit": "results/t/split.1 (finalize_state): OSError: [Errno 27] File too large",
            "read-only": "OSError: [Errno 30] Read-only file system: 'results/t/split.1'",
        }[fault]
        assert failed.stderr.splitlines()[-1] == f"espnet3_rules run-shard: error: {expected}"
        assert_kept(before, workdir)
        assert pending_shards(read_manifest(manifest_of("t"))) == [1]

        if fault == "disk-full":
            (results / "ballast").unlink()
        elif fault == "read-only":
            subprocess.run(["mount", "-o", "remount,rw", str(results)], check=True)
        rerun("t")
        assert merged_outputs(workdir, JOBS["t"]) == reference["t"]
    finally:
        if fault != "file-size-limit":
            subprocess.run(["umount", str(results)], check=True)
