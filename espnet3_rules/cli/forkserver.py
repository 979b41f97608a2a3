"""Warm processes for local runs: a fork server that keeps the imports of earlier commands.

Every rule runs one ``python -m espnet3_rules ...`` process, and most of a short
shard's time is importing the user's stack again (``import torch`` alone takes
1-2 s), where ESPnet3's Dask workers import it once per worker. Here the first
command starts a server for its interpreter, working directory and environment;
it holds the modules that the commands it ran had imported. Each later command
(the *client*) hands it its argv, working directory, environment and
stdin/stdout/stderr, and the server forks a child that runs the command just
as a fresh process would, then sends back the exit status, which the client
exits with (or the signal that killed the child, which the client dies of).

- Only the imports are shared: no user code runs in the server, so no env,
  model or CUDA context is ever inherited, and each shard still builds its env.
- A client that dies (Snakemake cancelling a job) takes its child with it, and
  a child dies with the server (``PR_SET_PDEATHSIG``).
- A server whose loaded source files changed, or that has started threads,
  declines, and the command runs in-process. It exits when idle.
- It is off inside SLURM jobs, off without ``fork``/``pidfd``, and off with
  ``ESPNET3_RULES_FORKSERVER=0``; then every command is a plain process.

Snakemake's ``benchmark:`` files then measure the client only; the child's CPU
time and peak memory are in the shard's log line.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import importlib
import io
import json
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SWITCH_ENV = "ESPNET3_RULES_FORKSERVER"  # "0" turns the fork server off
IDLE_EXIT_S = 10.0  # a server with no children and no requests for this long exits
START_TIMEOUT_S = 30.0
_VOLATILE_ENV = ("_", "OLDPWD", "SHLVL")  # differ between shells without changing what a command does
_HEADER = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1


def enabled(environ: Dict[str, str] = os.environ) -> bool:
    """True where commands may run in forked children of a warm server."""
    return (
        environ.get(SWITCH_ENV, "1") != "0"
        and "SLURM_JOB_ID" not in environ
        and sys.platform == "linux"
        and hasattr(os, "pidfd_open")
        and hasattr(socket, "send_fds")
    )


def interpreter_options() -> List[str]:
    """This interpreter's own command-line options (``-X ...``, ``-O``), to start the server alike."""
    options: List[str] = []
    args = iter(getattr(sys, "orig_argv", [sys.executable])[1:])
    for arg in args:
        if arg in ("-m", "-c", "-") or not arg.startswith("-"):
            break  # what to run starts here
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
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    path = base / f"espnet3-rules-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{path} is not a private directory of this user")
    return path


# --------------------------------------------------------------------------- client
def run_in_warm_process(module: str, argv: Sequence[str]) -> Optional[int]:
    """Run ``module.main(argv)`` in a child of the warm server; its exit status.

    ``None`` where no server can be used: the caller then runs the command
    itself. A child killed by a signal makes this process die of the same signal.
    """
    if not enabled():
        return None
    try:
        conn = _connect_or_start(server_dir(), server_key(dict(os.environ)))
    except OSError:
        return None
    with conn:
        request = json.dumps({"module": module, "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)})
        payload = request.encode("utf-8", "surrogateescape")
        try:
            socket.send_fds(conn, [_HEADER.pack(len(payload)) + payload], [0, 1, 2])
            reply = _read_message(conn)
        except OSError:
            return None
        if reply is None or "pid" not in reply:
            reason = (reply or {}).get("decline", "it closed the connection")
            print(f"espnet3_rules: fork server declined ({reason}); running in a fresh process", file=sys.stderr)
            return None
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
    sock_path.unlink(missing_ok=True)  # a dead server's socket; the lock keeps live ones safe
    cmd = [sys.executable, *interpreter_options(), "-m", "espnet3_rules.cli.forkserver", str(sock_path)]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
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


def _send_message(conn: socket.socket, message: dict) -> None:
    payload = json.dumps(message).encode()
    try:
        conn.sendall(_HEADER.pack(len(payload)) + payload)
    except OSError:
        pass  # the client is gone; nothing to tell


# --------------------------------------------------------------------------- server
@dataclass
class _Child:
    """A forked command: its client connection and the module names it reports at exit."""

    pid: int
    conn: socket.socket
    pidfd: int
    report_fd: int
    report: bytearray = field(default_factory=bytearray)

    def read_report(self) -> bool:
        """Read what the report pipe holds now; True once it reached its end (the child closed it)."""
        while True:
            try:
                data = os.read(self.report_fd, 1 << 16)
            except BlockingIOError:
                return False
            if not data:
                return True
            self.report += data


class ForkServer:
    """Accept commands on a Unix socket and run each in a forked child."""

    def __init__(self, sock_path: Path):
        self.sock_path = sock_path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(sock_path))
        self.listener.listen(64)
        self.inode = sock_path.stat().st_ino
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.children: Dict[int, _Child] = {}
        self.mtimes: Dict[str, float] = {}
        self.decline: Optional[str] = None
        self.last_activity = time.monotonic()
        self._note_module_files()

    def serve(self) -> None:
        """Serve until idle for :data:`IDLE_EXIT_S`, or until the code changed and no child is left."""
        while True:
            timeout = IDLE_EXIT_S - (time.monotonic() - self.last_activity)
            if not self.children and (timeout <= 0 or (self.decline and self.listener.fileno() < 0)):
                break
            events = self.selector.select(max(timeout, 0.1) if not self.children else None)
            for key, _ in events:
                kind = key.data[0] if isinstance(key.data, tuple) else key.data
                if kind == "accept":
                    self._accept()
                elif kind == "report":
                    self._read_report(key.data[1])
                elif kind == "exit":
                    self._reap(key.data[1])
                elif kind == "client":
                    self._client_gone(key.data[1])
            if events:
                self.last_activity = time.monotonic()
        self._close_listener()

    # ----------------------------------------------------------- requests
    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10.0)
        fds: List[int] = []
        try:
            first, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
            size = _HEADER.unpack(first[: _HEADER.size])[0]
            body = first[_HEADER.size :]
            while len(body) < size:
                chunk = conn.recv(size - len(body))
                if not chunk:
                    raise OSError("short request")
                body += chunk
            request = json.loads(body.decode("utf-8", "surrogateescape"))
        except (OSError, ValueError, struct.error):
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        reason = self.decline or self._why_not_fork(fds)
        if reason:
            for fd in fds:
                os.close(fd)
            _send_message(conn, {"decline": reason})
            conn.close()
            if self.decline:
                self._close_listener()
            return
        self._fork(conn, request, fds)

    def _why_not_fork(self, fds: List[int]) -> Optional[str]:
        if len(fds) != 3:
            return "stdin/stdout/stderr were not passed"
        if threading.active_count() > 1:
            self.decline = "the server has threads; forking it is unsafe"
        elif self._sources_changed():
            self.decline = "source files changed since they were imported"
        return self.decline

    def _fork(self, conn: socket.socket, request: dict, fds: List[int]) -> None:
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            os.close(report_r)
            _child_main(request, fds, report_w)
        os.close(report_w)
        for fd in fds:
            os.close(fd)
        child = _Child(pid=pid, conn=conn, pidfd=os.pidfd_open(pid), report_fd=report_r)
        self.children[pid] = child
        os.set_blocking(report_r, False)
        self.selector.register(child.pidfd, selectors.EVENT_READ, ("exit", pid))
        self.selector.register(report_r, selectors.EVENT_READ, ("report", pid))
        self.selector.register(conn, selectors.EVENT_READ, ("client", pid))
        _send_message(conn, {"pid": pid})

    def _read_report(self, pid: int) -> None:
        child = self.children[pid]
        if child.read_report():
            self.selector.unregister(child.report_fd)

    def _client_gone(self, pid: int) -> None:
        """The client closed its end (it was killed): end its child's whole process group."""
        child = self.children[pid]
        try:
            ended = not child.conn.recv(1 << 10)
        except OSError:
            ended = True
        self.selector.unregister(child.conn)
        if not ended:
            return  # a client sends nothing after its request: ignore it, keep the child
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:  # the child has not made its process group yet
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _reap(self, pid: int) -> None:
        child = self.children.pop(pid)
        _, status = os.waitpid(pid, 0)
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        child.read_report()  # the rest, written before the child exited
        for fileobj in (child.report_fd, child.conn):
            if fileobj in self.selector.get_map():
                self.selector.unregister(fileobj)
        os.close(child.report_fd)
        _send_message(child.conn, {"status": status})
        child.conn.close()
        if not self.decline:
            self._preload(child.report.decode("utf-8", "replace").split())

    # ----------------------------------------------------- warm modules
    def _preload(self, names: Sequence[str]) -> None:
        """Import what a child imported (in its order), so later children start with it."""
        for name in names:
            if name in sys.modules or name.startswith("__") or "__main__" in name:
                continue
            try:
                importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - a module that only imports in context stays cold
                sys.modules.pop(name, None)
        self._note_module_files()

    def _note_module_files(self) -> None:
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if path and path not in self.mtimes:
                try:
                    self.mtimes[path] = os.stat(path).st_mtime
                except OSError:
                    pass

    def _sources_changed(self) -> bool:
        for path, mtime in self.mtimes.items():
            try:
                if os.stat(path).st_mtime != mtime:
                    return True
            except OSError:
                return True
        return False

    def _close_listener(self) -> None:
        """Stop taking requests; remove the socket path unless a newer server took it."""
        if self.listener.fileno() < 0:
            return
        self.selector.unregister(self.listener)
        self.listener.close()
        try:
            if self.sock_path.stat().st_ino == self.inode:
                self.sock_path.unlink()
        except OSError:
            pass


def _child_main(request: dict, fds: List[int], report_w: int) -> None:
    """In the forked child: become the client's process, run the command, report, exit."""
    code = 1
    try:
        os.setpgid(0, 0)
        _die_with_parent()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        for std_fd, fd in enumerate(fds):
            os.dup2(fd, std_fd)
        os.closerange(3, report_w)  # the server's sockets, pidfds and pipes, and the passed originals
        os.closerange(report_w + 1, 1 << 20)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _reopen_std_streams(request["env"])
        sys.argv = [request["module"], *request["argv"]]
        code = importlib.import_module(request["module"]).main(request["argv"])
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - as an uncaught exception in a fresh process
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        with open(report_w, "w", closefd=True) as report:
            report.write("\n".join(sys.modules))
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this child when the server dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


def _reopen_std_streams(env: Dict[str, str]) -> None:
    """``sys.stdin/stdout/stderr`` over the passed descriptors, buffered as a fresh process's would be."""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        old = getattr(sys, name)
        tty = os.isatty(fd)
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(
            buffered,
            encoding=old.encoding,
            errors=old.errors,
            line_buffering=mode == "w" and (tty or name == "stderr"),
            write_through=mode == "w" and unbuffered,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m espnet3_rules.cli.forkserver SOCKET``: serve until idle."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m espnet3_rules.cli.forkserver SOCKET", file=sys.stderr)
        return 2
    importlib.import_module("espnet3_rules.cli.main")
    server = ForkServer(Path(args[0]))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.close(devnull)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
