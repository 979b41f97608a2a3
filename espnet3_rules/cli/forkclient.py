"""The fork server's client: what ``python -m espnet3_rules run-shard`` runs before it hands over.

It hands the warm server (:mod:`espnet3_rules.cli.forkserver`, which says how it works) its
argv, working directory, environment, umask, resource limits and stdin/stdout/stderr, and exits
with the status of the child that ran the command. Every process of a shard imports this module
first, so it imports little: no ``espnet3_rules`` package code, nothing the server alone needs.

The shard rule runs this file as a script under ``python -S -P`` (no ``site``: its ``.pth`` files
cost a Python start more than the rest of the client); where no server can take the command, the
script becomes (``exec``) ``python -m espnet3_rules`` with the command, as a plain start would be.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import socket
import stat
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

SWITCH_ENV = "ESPNET3_RULES_FORKSERVER"  # "0" turns the fork server off
START_TIMEOUT_S = 30.0
SERVER_ENV = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}  # torch.cuda.is_available() then leaves CUDA uninitialised
_VOLATILE_ENV = ("_", "OLDPWD", "SHLVL")  # differ between shells without changing what a command does
# every resource limit this Linux has, by number; RLIMIT_NOFILE over its alias RLIMIT_OFILE
_RLIMITS = {getattr(resource, name): name for name in sorted(dir(resource), reverse=True) if name.startswith("RLIMIT_")}
_HEADER = struct.Struct("!I")


def enabled(environ: Dict[str, str] = os.environ) -> bool:
    """True where commands may run in forked children of a warm server."""
    return (
        environ.get(SWITCH_ENV, "1") != "0"
        and "SLURM_JOB_ID" not in environ
        and sys.platform == "linux"
        and hasattr(os, "pidfd_open")
        and hasattr(socket, "send_fds")
    )


#: The options the script form of the client adds (see the module docstring): not the command's.
SCRIPT_OPTIONS = ("-S", "-P")


def interpreter_options() -> List[str]:
    """This interpreter's own command-line options (``-X ...``, ``-O``), to start the server alike
    (without :data:`SCRIPT_OPTIONS`: a plain ``python -m espnet3_rules`` and the script share a server)."""
    options: List[str] = []
    args = iter(getattr(sys, "orig_argv", [sys.executable])[1:])
    for arg in args:
        if arg in ("-m", "-c", "-") or not arg.startswith("-"):
            break  # what to run starts here
        if arg in SCRIPT_OPTIONS:
            continue
        options.append(arg)
        if arg in ("-X", "-W", "--check-hash-based-pycs"):
            options.append(next(args, ""))
    return options


def server_key(environ: Dict[str, str]) -> str:
    """Name of the server that may run a command of this interpreter, directory and environment."""
    env = {k: v for k, v in environ.items() if k not in _VOLATILE_ENV}
    ident = [sys.executable, interpreter_options(), os.getcwd(), sorted(env.items())]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def server_dir() -> Path:
    """Private directory for this user's sockets and locks (refused if another user owns it)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base:
        import tempfile

        base = tempfile.gettempdir()
    path = Path(base) / f"espnet3-rules-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{path} is not a private directory of this user")
    return path


def run_in_warm_process(argv: Sequence[str]) -> Optional[int]:
    """Run ``espnet3_rules.cli.main.main(argv)`` in a child of the warm server; its exit status.

    ``None`` where no server can be used or the command asks for GPUs: the
    caller then runs the command itself. A child killed by a signal makes this
    process die of the same signal.
    """
    if not enabled() or asks_for_gpus(argv):
        return None
    try:
        conn = _connect_or_start(server_dir(), server_key(dict(os.environ)))
    except OSError:
        return None
    with conn:
        request = {"argv": [sys.argv[0], *argv], "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(),
                   "rlimits": {name: list(resource.getrlimit(res)) for res, name in _RLIMITS.items()}}
        payload = json.dumps(request).encode("utf-8", "surrogateescape")
        try:
            socket.send_fds(conn, [_HEADER.pack(len(payload)) + payload], [0, 1, 2])
            reply = _read_message(conn)
        except OSError:
            return None
        if reply is None or "pid" not in reply:
            reason = (reply or {}).get("decline", "it closed the connection")
            print(f"espnet3_rules: fork server declined ({reason}); running in a fresh process", file=sys.stderr)
            return None
        with forwarded_sigterm(reply["pid"]):
            final = _read_message(conn)
    if final is None or "status" not in final:
        print(f"espnet3_rules: error: the fork server ended while running pid {reply['pid']}", file=sys.stderr)
        return 1
    code = os.waitstatus_to_exitcode(final["status"])
    if code < 0:
        sys.stdout.flush()
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL and SIGSTOP have no handler to reset
        os.kill(os.getpid(), -code)
    return code


@contextmanager
def forwarded_sigterm(pid: int) -> Iterator[None]:
    """While active, a SIGTERM to this client is passed on to the forked child ``pid`` (which then
    stops its shard cleanly, see ``run_shard``), and the client waits for its exit status."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # already gone: its status is on the way
        yield
        return

    def forward(signum: int, frame: Any) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except OSError:
            pass  # it has exited meanwhile

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(pidfd)


def asks_for_gpus(argv: Sequence[str]) -> bool:
    """True where ``argv`` holds ``--gpus N`` with N != 0 (or ``--gpus=N``, or an abbreviation argparse takes)."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if len(name) > 2 and "--gpus".startswith(name):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                if int(value) != 0:
                    return True
            except ValueError:
                return True  # argparse will complain; a fresh process says how
    return False


def _umask() -> int:
    """This process's umask (read by setting it, then back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _connect(sock_path: Path) -> Optional[socket.socket]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock_path))
    except OSError:
        conn.close()
        return None
    return conn


def _connect_or_start(directory: Path, key: str) -> socket.socket:
    """A connection to the server ``key``, started first (under a lock) where none answers."""
    import fcntl

    sock_path = directory / f"{key}.sock"
    conn = _connect(sock_path)
    if conn is not None:
        return conn
    with open(directory / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(sock_path)
        if conn is None:
            _start_server(sock_path)
            conn = _connect(sock_path)
    if conn is None:
        raise OSError(f"no fork server answers at {sock_path}")
    return conn


def _start_server(sock_path: Path) -> None:
    """Start a detached server on ``sock_path`` and wait until it listens."""
    import selectors
    import subprocess

    sock_path.unlink(missing_ok=True)  # a dead server's socket; the lock keeps live ones safe
    cmd = [sys.executable, *interpreter_options(), "-m", "espnet3_rules.cli.forkserver", str(sock_path)]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, **SERVER_ENV),
    )  # fmt: skip
    assert proc.stdout is not None
    with proc.stdout:
        ready = selectors.DefaultSelector()
        ready.register(proc.stdout, selectors.EVENT_READ)
        if not ready.select(START_TIMEOUT_S) or proc.stdout.readline() != b"ready\n":
            proc.kill()
            raise OSError(f"the fork server for {sock_path} did not start")


def _read_message(conn: socket.socket) -> Optional[dict]:
    """One length-prefixed JSON message, or ``None`` at end of stream."""
    header = _read_exact(conn, _HEADER.size)
    if header is None:
        return None
    body = _read_exact(conn, _HEADER.unpack(header)[0])
    return None if body is None else json.loads(body.decode("utf-8", "surrogateescape"))


def _read_exact(conn: socket.socket, size: int) -> Optional[bytes]:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main(argv: Sequence[str]) -> int:
    """The script form: ``argv`` in a child of the warm server, else ``exec`` of ``python -m espnet3_rules``."""
    status = run_in_warm_process(argv)
    if status is not None:
        return status
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *interpreter_options(), "-m", "espnet3_rules", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
