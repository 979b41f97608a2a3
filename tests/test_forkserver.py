"""The fork server: commands run in warm children exactly as fresh processes would."""

from __future__ import annotations

import json
import os
import resource
import signal
import shutil
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

import toys as fx
from espnet3_rules.cli import forkclient, forkserver
from espnet3_rules.engine.attempts import ATTEMPTS_NAME

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CLIENT = """
import sys
from espnet3_rules.cli.forkclient import run_in_warm_process
status = run_in_warm_process(sys.argv[1:])
if status is None:  # what python -m espnet3_rules does too
    print("ran in-process", file=sys.stderr)
    import fs_target
    status = fs_target.main(sys.argv[1:])
sys.exit(status)
"""
# The servers of these tests run fs_target.main where the real one runs espnet3_rules.cli.main.main;
# a test starts one where its client looks for a server, so that the client does not start a real one.
SERVER = """
import atexit, importlib, os, sys
from pathlib import Path
from espnet3_rules.cli import forkserver
import fs_target
sock, atexit_log, *imports = sys.argv[1:]
for name in imports:
    importlib.import_module(name)
atexit.register(lambda: open(atexit_log, "a").write(f"{os.getpid()}\\n"))
forkserver.serve(Path(sock), fs_target.main)
"""
SOCKET = "import os; from espnet3_rules.cli import forkclient as f; print(f.server_dir() / (f.server_key(dict(os.environ)) + '.sock'))"
LIMITS = {  # a client's resource limits, all below this machine's usual hard limits
    "RLIMIT_NOFILE": (256, 512), "RLIMIT_AS": (64 << 30, 128 << 30), "RLIMIT_FSIZE": (1 << 30, 2 << 30),
    "RLIMIT_CORE": (0, 1 << 20), "RLIMIT_STACK": (4 << 20, 16 << 20), "RLIMIT_CPU": (600, 1200),
}  # fmt: skip


@pytest.fixture
def env(tmp_path):
    """Environment of a client with its own server directory and user site-packages; servers ended afterwards."""
    run_dir = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))  # socket paths must stay under 108 bytes
    (tmp_path / "mods").mkdir()
    values = dict(os.environ, XDG_RUNTIME_DIR=str(run_dir), FS_VALUE="v1", PYTHONUSERBASE=str(tmp_path / "userbase"),
                  PYTHONPATH=os.pathsep.join([str(tmp_path / "mods"), str(TESTS), str(REPO)]))
    for name in ("SLURM_JOB_ID", forkclient.SWITCH_ENV, "PYTHONNOUSERSITE"):
        values.pop(name, None)
    yield values
    for pid in processes_under(run_dir):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(run_dir, ignore_errors=True)


def processes_under(run_dir):
    """Pids of the servers (and their children) whose socket is in ``run_dir``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(run_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass  # it ended meanwhile
    return pids


@pytest.fixture
def serve(env, tmp_path):
    """``serve(cwd)``: start a server of ``fs_target.main`` where a client in ``cwd`` (with ``environ``) looks for one."""
    servers = []

    def start(cwd, environ=None, imports=(), preexec_fn=None):
        environ = environ or env
        sock = subprocess.run([sys.executable, "-c", SOCKET], env=environ, cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
        proc = subprocess.Popen([sys.executable, "-c", SERVER, sock, str(tmp_path / "server-atexit.log"), *imports],
                                env=environ, cwd=cwd, stdout=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        servers.append(proc)
        assert proc.stdout.readline() == "ready\n"
        return proc

    yield start
    for proc in servers:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.fixture
def user_site(env):
    """The user site-packages of ``env``'s interpreter: installed code, as a pip install --user makes it."""
    if not site.ENABLE_USER_SITE:
        pytest.skip("this interpreter has no user site-packages (a venv?)")
    path = Path(sysconfig.get_path("purelib", f"{os.name}_user", vars={"userbase": env["PYTHONUSERBASE"]}))
    path.mkdir(parents=True)
    return path


def client(env, *argv, cwd=None, stdin=None, check_status=None, preexec_fn=None):
    proc = subprocess.run([sys.executable, "-c", CLIENT, *map(str, argv)], env=env, cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=60, preexec_fn=preexec_fn)
    if check_status is not None:
        assert proc.returncode == check_status, proc.stderr
    return proc


def info(env, **kwargs):
    proc = client(env, "info", check_status=0, **kwargs)
    return json.loads(proc.stdout), proc


def imported(env, module, **kwargs):
    """What ``module`` (imported by a command) has as ``VERSION``."""
    return client(env, "import", module, check_status=0, **kwargs).stdout.strip()


def test_commands_run_in_children_of_one_server_with_the_clients_cwd_env_and_stdio(env, serve, tmp_path):
    server = serve(tmp_path)
    first, proc = info(env, cwd=tmp_path, stdin="hello")
    second, _ = info(env, cwd=tmp_path)
    assert first["ppid"] == second["ppid"] == server.pid and first["pid"] != second["pid"]
    assert first["cwd"] == str(tmp_path) and first["env"] == "v1" and first["stdin"] == "hello"
    assert proc.stderr.strip() == "to stderr", "the command ran in the server's child, not in-process"


def test_exit_status_and_signals_reach_the_client(env, serve, tmp_path):
    serve(tmp_path)
    assert client(env, "exit", 7, cwd=tmp_path).returncode == 7
    assert client(env, "kill", int(signal.SIGKILL), cwd=tmp_path).returncode == -signal.SIGKILL
    assert client(env, "kill", int(signal.SIGTERM), cwd=tmp_path).returncode == -signal.SIGTERM


def test_another_environment_or_directory_gets_another_server(env, serve, tmp_path):
    (tmp_path / "b").mkdir()
    other = dict(env, FS_VALUE="v2")
    servers = [serve(tmp_path).pid, serve(tmp_path, other).pid, serve(tmp_path / "b").pid]
    base, _ = info(env, cwd=tmp_path)
    other_env, _ = info(other, cwd=tmp_path)
    other_dir, _ = info(env, cwd=tmp_path / "b")
    assert other_env["env"] == "v2"
    assert [base["ppid"], other_env["ppid"], other_dir["ppid"]] == servers


def test_installed_modules_a_command_imported_are_warm_for_the_next(env, serve, user_site, tmp_path):
    (user_site / "fs_warm.py").write_text("VERSION = 1\n")
    (tmp_path / "mods" / "fs_cold.py").write_text("VERSION = 1\n")
    serve(tmp_path)
    assert imported(env, "fs_warm", cwd=tmp_path) == imported(env, "fs_cold", cwd=tmp_path) == "1"
    after, _ = info(env, cwd=tmp_path)
    assert after["warm"] == ["fs_warm"], "the user's own module (on PYTHONPATH) must stay out of the server"


def test_user_modules_are_never_imported_in_the_server(env, serve, tmp_path):
    marker = tmp_path / "imported-in"
    (tmp_path / "mods" / "fs_marker.py").write_text(
        f"import os\nVERSION = os.getpid()\nwith open({str(marker)!r}, 'a') as f:\n    f.write(f'{{VERSION}}\\n')\n")
    server = serve(tmp_path)
    children = [imported(env, "fs_marker", cwd=tmp_path) for _ in range(2)]
    after, _ = info(env, cwd=tmp_path)  # reaped, so the server is done preloading the second's imports
    assert marker.read_text().split() == children and str(server.pid) not in children
    assert after["warm"] == []


def test_a_changed_source_file_is_never_served_stale(env, serve, user_site, tmp_path):
    module = user_site / "fs_changing.py"
    module.write_text("VERSION = 1\n")
    server = serve(tmp_path)
    assert imported(env, "fs_changing", cwd=tmp_path) == "1"
    assert info(env, cwd=tmp_path)[0]["warm"] == ["fs_changing"]  # the server has it loaded now
    module.write_text("VERSION = 2\n")
    os.utime(module, (time.time() + 5, time.time() + 5))
    changed = client(env, "import", "fs_changing", cwd=tmp_path, check_status=0)
    assert changed.stdout.strip() == "2"
    assert "declined (source files changed" in changed.stderr and "ran in-process" in changed.stderr
    server.wait(timeout=10)  # a declining server exits; the next command finds a fresh one
    serve(tmp_path)
    assert imported(env, "fs_changing", cwd=tmp_path) == "2"


def set_limits():
    os.umask(0o077)
    for name, limit in LIMITS.items():
        resource.setrlimit(getattr(resource, name), limit)


def test_a_child_takes_the_clients_umask_and_resource_limits(env, serve, tmp_path):
    (tmp_path / "mods" / "fs_probe.py").write_text(
        "import json, os, resource, stat\nopen('made', 'w').close()\n"
        f"VERSION = json.dumps({{'ppid': os.getppid(), 'mode': stat.S_IMODE(os.stat('made').st_mode), "
        f"'limits': {{n: resource.getrlimit(getattr(resource, n)) for n in {sorted(LIMITS)!r}}}}})\n")
    server = serve(tmp_path, preexec_fn=lambda: os.umask(0o022))
    probe = json.loads(imported(env, "fs_probe", cwd=tmp_path, preexec_fn=set_limits))
    assert probe["ppid"] == server.pid
    assert oct(probe["mode"]) == oct(0o600), "a file made under the client's umask 077"
    assert probe["limits"] == {name: list(limit) for name, limit in LIMITS.items()}


def test_children_draw_their_own_random_numbers_as_fresh_processes_do(env, serve, tmp_path):
    (tmp_path / "mods" / "fs_draw.py").write_text(
        "import os, numpy, torch\nVERSION = f'{os.getppid()} {numpy.random.random()} {torch.rand(1).item()}'\n")
    server = serve(tmp_path, imports=["numpy", "torch"])  # their global generators are seeded in the server
    draws = [imported(env, "fs_draw", cwd=tmp_path).split() for _ in range(2)]
    assert draws[0][0] == draws[1][0] == str(server.pid)
    assert draws[0][1] != draws[1][1] and draws[0][2] != draws[1][2]


def test_a_server_with_lower_hard_limits_than_the_client_declines(env, serve, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 64:
        pytest.skip("RLIMIT_NOFILE too low to lower")
    serve(tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    ran = client(env, "exit", 0, cwd=tmp_path, check_status=0)
    assert "declined (the client's resource limits exceed the server's)" in ran.stderr
    assert "ran in-process" in ran.stderr


def test_a_child_runs_its_own_atexit_handlers_never_the_servers(env, serve, tmp_path):
    (tmp_path / "mods" / "fs_exits.py").write_text(
        "import atexit, multiprocessing, os, time\n"
        "def late():\n    os.closerange(0, 3)  # the client's pipes: its caller would wait for this process too\n"
        "    time.sleep(0.5)\n    open('joined', 'w').close()\n"
        "atexit.register(lambda: open('own-atexit', 'w').write(str(os.getpid())))\n"
        "multiprocessing.get_context('fork').Process(target=late).start()  # joined at exit, as in a fresh process\n"
        "VERSION = os.getpid()\n")
    serve(tmp_path, imports=["multiprocessing.util"])  # a server that has imported multiprocessing (and logging)
    child = imported(env, "fs_exits", cwd=tmp_path)
    assert (tmp_path / "own-atexit").read_text() == child
    assert (tmp_path / "joined").exists(), "the child ended before its multiprocessing child"
    server_log = tmp_path / "server-atexit.log"
    assert not server_log.exists() or child not in server_log.read_text().split()


def request_bytes(fields):
    payload = json.dumps(fields).encode()
    return forkclient._HEADER.pack(len(payload)) + payload


def test_a_silent_or_half_sent_connection_does_not_hold_up_others(env, serve, tmp_path):
    serve(tmp_path)
    sock = subprocess.run([sys.executable, "-c", SOCKET], env=env, cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    silent, half = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    with silent, half:
        silent.connect(sock)
        half.connect(sock)
        half.sendall(request_bytes({"argv": ["x"]})[:10])
        start = time.monotonic()
        client(env, "exit", 3, cwd=tmp_path, check_status=3)
        assert time.monotonic() - start < forkserver.REQUEST_TIMEOUT_S / 2
        for conn in (silent, half):  # and the server drops them in time
            conn.settimeout(forkserver.REQUEST_TIMEOUT_S + 10)
            assert conn.recv(1) == b""


def test_a_request_naming_a_module_is_refused_and_imports_nothing(env, serve, tmp_path):
    marker = tmp_path / "evil-imported"
    (tmp_path / "mods" / "fs_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef main(argv):\n    return 0\n")
    serve(tmp_path)
    sock = subprocess.run([sys.executable, "-c", SOCKET], env=env, cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    fields = {"module": "fs_evil", "argv": ["x", "info"], "cwd": str(tmp_path), "env": env, "umask": 0o022,
              "rlimits": {}}
    with socket.socket(socket.AF_UNIX) as conn, open(os.devnull, "r+") as devnull:
        conn.connect(sock)
        socket.send_fds(conn, [request_bytes(fields)], [devnull.fileno()] * 3)
        conn.settimeout(10)
        reply = forkclient._read_message(conn)
        assert forkclient._read_message(conn) is None, "the server closed the connection"
    assert "pid" not in reply and "malformed request" in reply["decline"]
    assert not marker.exists()


def test_the_server_starts_with_the_nvml_cuda_check(env, tmp_path):
    ran = subprocess.run([sys.executable, "-m", "espnet3_rules", "run-shard", "--help"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and "--shard" in ran.stdout and "declined" not in ran.stderr, ran.stderr
    (server,) = processes_under(env["XDG_RUNTIME_DIR"])
    assert b"PYTORCH_NVML_BASED_CUDA_CHECK=1" in Path(f"/proc/{server}/environ").read_bytes().split(b"\0")


def test_a_server_with_cuda_initialised_declines(env, serve, tmp_path):
    (tmp_path / "mods" / "torch").mkdir()
    (tmp_path / "mods" / "torch" / "__init__.py").write_text(
        "class cuda:\n    @staticmethod\n    def is_initialized():\n        return True\n")
    serve(tmp_path, imports=["torch"])  # this stub stands in for a torch that a preload had initialise CUDA
    ran = client(env, "exit", 0, cwd=tmp_path, check_status=0)
    assert "declined (CUDA is initialised in the server)" in ran.stderr and "ran in-process" in ran.stderr


@pytest.mark.parametrize("gpus", [["--gpus", "1"], ["--gpus=2"], ["--gpu", "1"]])
def test_shards_that_ask_for_gpus_run_as_plain_processes_without_asking_a_server(env, tmp_path, gpus):
    ran = client(env, "exit", 0, "run-shard", *gpus, cwd=tmp_path, check_status=0)
    assert "ran in-process" in ran.stderr and "declined" not in ran.stderr
    assert not list(Path(env["XDG_RUNTIME_DIR"]).glob("espnet3-rules-*/*.sock"))


@pytest.mark.parametrize("argv, asks", [
    (["run-shard", "--shard", "3"], False), (["--gpus", "0"], False), (["--gpus=0"], False), (["--gpus", "1"], True),
    (["--gpus=1"], True), (["--gp", "2"], True), (["--gpus"], True), (["--gpusx", "1"], False),
])  # fmt: skip
def test_asks_for_gpus(argv, asks):
    assert forkclient.asks_for_gpus(argv) == asks


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


def test_a_killed_client_takes_its_child_down(env, serve, tmp_path):
    serve(tmp_path)
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, "sleep", str(pid_file)], env=env, cwd=tmp_path)
    child = wait_for_pid(pid_file, proc)
    proc.kill()
    proc.wait()
    wait_gone(child)


@pytest.mark.parametrize("switch", [{"SLURM_JOB_ID": "42"}, {forkclient.SWITCH_ENV: "0"}])
def test_off_inside_slurm_jobs_and_when_switched_off(env, tmp_path, switch):
    ran = client(dict(env, **switch), "info", cwd=tmp_path, check_status=0)
    assert "ran in-process" in ran.stderr
    assert not list(Path(env["XDG_RUNTIME_DIR"]).glob("espnet3-rules-*/*.sock"))


def test_a_killed_server_takes_its_children_down_and_the_client_fails(env, serve, tmp_path):
    server = serve(tmp_path)
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, "sleep", str(pid_file)], env=env, cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    child = wait_for_pid(pid_file, proc)
    server.kill()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "fork server ended while running" in stderr
    wait_gone(child)


@pytest.mark.parametrize("orig_argv, options", [
    (["python", "-m", "espnet3_rules", "run-shard", "-m"], []),
    (["python", "-X", "importtime", "-O", "-m", "espnet3_rules"], ["-X", "importtime", "-O"]),
    (["python", "-c", "code", "-m", "x"], []),
    (["python", "-Wignore", "script.py", "-m"], ["-Wignore"]),
    (["python", "-S", "-P", "-X", "dev", "forkclient.py", "run-shard"], ["-X", "dev"]),  # the shard rule's script form
])
def test_the_server_starts_with_the_clients_interpreter_options(monkeypatch, orig_argv, options):
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert forkclient.interpreter_options() == options


def test_the_script_form_execs_a_plain_start_where_no_server_takes_the_command(tmp_path):
    """``python -S -P forkclient.py run-shard ...`` (the shard rule) without a server: the same process
    becomes ``python -m espnet3_rules`` (its pid is the shard's: a SIGTERM to it reaches the shard)."""
    config = fx.write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), runner="toys.MyTextRunner",
                             provider="toys.SampleProvider", provider_config={"n": 2})
    fx.run_main("plan", "--config", config, "--job", "j")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fx.REPO), str(TESTS)]), **{forkclient.SWITCH_ENV: "0"})
    proc = subprocess.Popen([sys.executable, "-S", "-P", forkclient.__file__, "run-shard", "--manifest",
                             str(tmp_path / "out" / "manifest.json"), "--shard", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert stdout.startswith(f"{tmp_path / 'out' / 'split.0'}: done (2 items;")
    [attempt] = json.loads((tmp_path / "out" / "split.0" / ATTEMPTS_NAME).read_text())["attempts"]
    assert attempt["pid"] == proc.pid, "exec kept the client's process"
