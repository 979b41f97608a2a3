"""The fork server: commands run in warm children exactly as fresh processes would."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from espnet3_rules.cli import forkserver

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CLIENT = """
import sys
from espnet3_rules.cli.forkserver import run_in_warm_process
status = run_in_warm_process("fs_target", sys.argv[1:])
if status is None:  # what python -m espnet3_rules does too
    print("ran in-process", file=sys.stderr)
    import fs_target
    status = fs_target.main(sys.argv[1:])
sys.exit(status)
"""


@pytest.fixture
def env(tmp_path):
    """Environment of a client with its own server directory; servers stopped afterwards."""
    run_dir = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))  # socket paths must stay under 108 bytes
    (tmp_path / "mods").mkdir()
    values = dict(os.environ, XDG_RUNTIME_DIR=str(run_dir), FS_VALUE="v1",
                  PYTHONPATH=os.pathsep.join([str(tmp_path / "mods"), str(TESTS), str(REPO)]))
    values.pop("SLURM_JOB_ID", None)
    values.pop(forkserver.SWITCH_ENV, None)
    yield values
    subprocess.run(["pkill", "-f", str(run_dir)], check=False)
    shutil.rmtree(run_dir, ignore_errors=True)


def client(env, *argv, cwd=None, stdin=None, check_status=None):
    proc = subprocess.run([sys.executable, "-c", CLIENT, *map(str, argv)], env=env, cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=60)
    if check_status is not None:
        assert proc.returncode == check_status, proc.stderr
    return proc


def info(env, **kwargs):
    proc = client(env, "info", check_status=0, **kwargs)
    return json.loads(proc.stdout), proc


def test_commands_run_in_children_of_one_server_with_the_clients_cwd_env_and_stdio(env, tmp_path):
    first, proc = info(env, cwd=tmp_path, stdin="hello")
    second, _ = info(env, cwd=tmp_path)
    assert first["ppid"] == second["ppid"] and first["pid"] != second["pid"], "both must be forked by one server"
    assert first["ppid"] not in (os.getpid(), 1)
    assert first["cwd"] == str(tmp_path) and first["env"] == "v1" and first["stdin"] == "hello"
    assert proc.stderr.strip() == "to stderr", "the command ran in the server's child, not in-process"


def test_exit_status_and_signals_reach_the_client(env, tmp_path):
    assert client(env, "exit", 7, cwd=tmp_path).returncode == 7
    assert client(env, "kill", int(signal.SIGKILL), cwd=tmp_path).returncode == -signal.SIGKILL
    assert client(env, "kill", int(signal.SIGTERM), cwd=tmp_path).returncode == -signal.SIGTERM


def test_another_environment_or_directory_gets_another_server(env, tmp_path):
    (tmp_path / "b").mkdir()
    base, _ = info(env, cwd=tmp_path)
    other_env, _ = info(dict(env, FS_VALUE="v2"), cwd=tmp_path)
    other_dir, _ = info(env, cwd=tmp_path / "b")
    assert other_env["env"] == "v2"
    assert len({base["ppid"], other_env["ppid"], other_dir["ppid"]}) == 3


def test_modules_a_command_imported_are_warm_for_the_next(env, tmp_path):
    (tmp_path / "mods" / "fs_warm.py").write_text("VERSION = 1\n")
    assert client(env, "import", "fs_warm", cwd=tmp_path, check_status=0).stdout.strip() == "1"
    after, _ = info(env, cwd=tmp_path)
    assert after["warm"] == ["fs_warm"]


def test_a_changed_source_file_is_never_served_stale(env, tmp_path):
    module = tmp_path / "mods" / "fs_changing.py"
    module.write_text("VERSION = 1\n")
    assert client(env, "import", "fs_changing", cwd=tmp_path, check_status=0).stdout.strip() == "1"
    info(env, cwd=tmp_path)  # the server has fs_changing loaded now
    module.write_text("VERSION = 2\n")
    os.utime(module, (time.time() + 5, time.time() + 5))
    changed = client(env, "import", "fs_changing", cwd=tmp_path, check_status=0)
    assert changed.stdout.strip() == "2"
    assert "declined (source files changed" in changed.stderr and "ran in-process" in changed.stderr
    assert client(env, "import", "fs_changing", cwd=tmp_path, check_status=0).stdout.strip() == "2"


def wait_for_pid(pid_file, proc):
    """The pid a ``sleep`` command wrote, once it started."""
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the child never started"
        time.sleep(0.05)
    return int(pid_file.read_text())


def running(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid):
    deadline = time.monotonic() + 10
    while running(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.05)


def test_a_killed_client_takes_its_child_down(env, tmp_path):
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, "sleep", str(pid_file)], env=env, cwd=tmp_path)
    child = wait_for_pid(pid_file, proc)
    proc.kill()
    proc.wait()
    wait_gone(child)


@pytest.mark.parametrize("switch", [{"SLURM_JOB_ID": "42"}, {forkserver.SWITCH_ENV: "0"}])
def test_off_inside_slurm_jobs_and_when_switched_off(env, tmp_path, switch):
    ran = client(dict(env, **switch), "info", cwd=tmp_path, check_status=0)
    assert "ran in-process" in ran.stderr
    assert not list(Path(env["XDG_RUNTIME_DIR"]).glob("espnet3-rules-*/*.sock"))


def test_a_killed_server_takes_its_children_down_and_the_client_fails(env, tmp_path):
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, "sleep", str(pid_file)], env=env, cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    child = wait_for_pid(pid_file, proc)
    server = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(server, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "fork server ended while running" in stderr
    wait_gone(child)


@pytest.mark.parametrize("orig_argv, options", [
    (["python", "-m", "espnet3_rules", "run-shard", "-m"], []),
    (["python", "-X", "importtime", "-O", "-m", "espnet3_rules"], ["-X", "importtime", "-O"]),
    (["python", "-c", "code", "-m", "x"], []),
    (["python", "-Wignore", "script.py", "-m"], ["-Wignore"]),
])
def test_the_server_starts_with_the_clients_interpreter_options(monkeypatch, orig_argv, options):
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert forkserver.interpreter_options() == options
