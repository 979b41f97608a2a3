"""Warm processes for local runs: a fork server that keeps the imports of earlier shards.

Every rule runs one ``python -m espnet3_rules ...`` process, and most of a short
shard's time is importing the user's stack again (``import torch`` above all),
where ESPnet3's Dask workers import it once per worker. Here the first
``run-shard`` starts a server for its interpreter, working directory and
environment; it holds the installed modules that the shards it ran had imported.
Each later ``run-shard`` (the *client*) hands it its argv, working directory,
environment, umask, resource limits and stdin/stdout/stderr, and the server forks
a child that becomes that process and runs ``espnet3_rules.cli.main.main(argv)``
(nothing else: a request names no module), then sends back the exit status,
which the client exits with (or the signal that killed the child, which the
client dies of). A SIGTERM to the client is passed on to the child.

- Only imports of installed code are shared: the server imports (after a shard
  used them) only modules of the standard library, of site-packages and of
  ``espnet3_rules``, never the user's own modules (working directory,
  ``PYTHONPATH``), so no user code runs in it and no env, model or CUDA context is
  ever inherited. It starts with ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, so that
  ``torch.cuda.is_available()`` in an import does not initialise CUDA.
- A child forgets the server's ``atexit`` handlers, sets the client's umask and
  resource limits, reseeds the global random generators of numpy and torch (as a
  fresh import would seed them: each child draws its own numbers; Python's
  ``random`` reseeds itself after a fork), and exits with ``os._exit`` after its
  own handlers ran.
- A client that dies (killed) takes its child with it (SIGKILL), and
  a child dies with the server (``PR_SET_PDEATHSIG``).
- A server whose loaded source files changed, that has started threads or has
  CUDA initialised declines, and so does one whose resource limits are below
  the client's; the command then runs in a fresh process. Shards that ask for
  GPUs (``--gpus N``) never ask the server. A connection that sends no whole
  request within :data:`REQUEST_TIMEOUT_S` is dropped without holding up others.
  The server exits when idle.
- It is off inside SLURM jobs, off without ``fork``/``pidfd``, and off with
  ``ESPNET3_RULES_FORKSERVER=0``; then every command is a plain process.

The client side is :mod:`espnet3_rules.cli.forkclient`; the child's CPU time and peak
memory are in the shard's log line (the process Snakemake started is only the client).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import io
import json
import os
import resource
import selectors
import signal
import site
import socket
import sys
import sysconfig
import threading
import time
import traceback
from dataclasses import dataclass, field
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from espnet3_rules.cli.forkclient import _HEADER, _RLIMITS

IDLE_EXIT_S = 10.0  # a server with no children and no requests for this long exits
REQUEST_TIMEOUT_S = 5.0  # a connection must have sent its whole request by then
MAX_REQUEST_BYTES = 1 << 24
_REQUEST_FIELDS = {"argv": list, "cwd": str, "env": dict, "umask": int, "rlimits": dict}
_PR_SET_PDEATHSIG = 1

Entry = Callable[[List[str]], Optional[int]]


def _send_message(conn: socket.socket, message: dict) -> None:
    payload = json.dumps(message).encode()
    try:
        conn.sendall(_HEADER.pack(len(payload)) + payload)
    except OSError:
        pass  # the client is gone; nothing to tell


# --------------------------------------------------------------------------- server
@dataclass
class _Pending:
    """A connection whose request has not all arrived yet."""

    conn: socket.socket
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    fds: List[int] = field(default_factory=list)

    def read(self) -> Optional[bytes]:
        """Read what arrived; the request's body once it is whole. OSError or ValueError for a bad one."""
        chunk, fds, _, _ = socket.recv_fds(self.conn, 1 << 16, 3)
        self.fds += fds
        if not chunk:
            raise OSError("the client closed the connection mid-request")
        self.data += chunk
        if len(self.data) < _HEADER.size:
            return None
        end = _HEADER.size + _HEADER.unpack_from(self.data)[0]
        if end > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
        return bytes(self.data[_HEADER.size : end]) if len(self.data) >= end else None

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.conn.close()


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
    """Accept commands on a Unix socket and run each as ``entry(argv)`` in a forked child."""

    def __init__(self, sock_path: Path, entry: Entry):
        self.sock_path = sock_path
        self.entry = entry
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(sock_path))
        self.listener.listen(64)
        self.inode = sock_path.stat().st_ino
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, ("accept", 0))
        self.pending: Dict[int, _Pending] = {}
        self.children: Dict[int, _Child] = {}
        self.mtimes: Dict[str, float] = {}
        self.cold: Set[str] = set()  # modules a preload could not import
        self.decline: Optional[str] = None
        self.last_activity = time.monotonic()
        self._note_module_files()

    def serve(self) -> None:
        """Serve until idle for :data:`IDLE_EXIT_S`, or until the code changed and no child is left."""
        while True:
            now = time.monotonic()
            self._drop_stalled(now)
            idle = not self.children and not self.pending
            if idle and (now - self.last_activity >= IDLE_EXIT_S or (self.decline and self.listener.fileno() < 0)):
                break
            deadlines = [p.deadline for p in self.pending.values()]
            if not self.children:
                deadlines.append(self.last_activity + IDLE_EXIT_S)
            events = self.selector.select(max(min(deadlines) - now, 0.1) if deadlines else None)
            for key, _ in events:
                if self.selector.get_map().get(key.fd) is not key:
                    continue  # unregistered by an earlier event of this batch (a reaped child's report)
                kind, ident = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "request":
                    self._read_request(ident)
                elif kind == "report":
                    self._read_report(ident)
                elif kind == "exit":
                    self._reap(ident)
                elif kind == "client":
                    self._client_gone(ident)
            if events:
                self.last_activity = time.monotonic()
        self._close_listener()

    # ----------------------------------------------------------- requests
    def _accept(self) -> None:
        """Take a connection; its request is read as it arrives, beside everything else."""
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.setblocking(False)
        self.pending[conn.fileno()] = _Pending(conn, time.monotonic() + REQUEST_TIMEOUT_S)
        self.selector.register(conn, selectors.EVENT_READ, ("request", conn.fileno()))

    def _drop_stalled(self, now: float) -> None:
        for fd in [fd for fd, pending in self.pending.items() if pending.deadline <= now]:
            self._forget_pending(fd).close()

    def _forget_pending(self, fd: int) -> _Pending:
        pending = self.pending.pop(fd)
        self.selector.unregister(pending.conn)
        return pending

    def _read_request(self, fd: int) -> None:
        try:
            body = self.pending[fd].read()
        except BlockingIOError:
            return
        except (OSError, ValueError):
            self._forget_pending(fd).close()
            return
        if body is None:
            return
        pending = self._forget_pending(fd)
        try:
            request = _parse_request(body)
        except ValueError as exc:
            self._refuse(pending, str(exc))
            return
        reason = self.decline or self._why_not_fork(request, pending.fds)
        if reason:
            self._refuse(pending, reason)
            if self.decline:
                self._close_listener()
            return
        self._fork(pending.conn, request, pending.fds)

    def _refuse(self, pending: _Pending, reason: str) -> None:
        _send_message(pending.conn, {"decline": reason})
        pending.close()

    def _why_not_fork(self, request: dict, fds: List[int]) -> Optional[str]:
        if len(fds) != 3:
            return "stdin/stdout/stderr were not passed"
        if not _limits_fit(request["rlimits"]):
            return "the client's resource limits exceed the server's"
        if threading.active_count() > 1:
            self.decline = "the server has threads; forking it is unsafe"
        elif _cuda_initialized():
            self.decline = "CUDA is initialised in the server"
        elif self._sources_changed():
            self.decline = "source files changed since they were imported"
        return self.decline

    def _fork(self, conn: socket.socket, request: dict, fds: List[int]) -> None:
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            os.close(report_r)
            _child_main(self.entry, request, fds, report_w)
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
        """The client closed its end (it was killed): SIGKILL its child's whole process group.

        Not SIGTERM: a shard takes that as "stop after this item", which may take long, and
        nobody waits for its result any more (a shard's last journal commit stands).
        """
        child = self.children[pid]
        try:
            ended = not child.conn.recv(1 << 10)
        except BlockingIOError:
            return
        except OSError:
            ended = True
        self.selector.unregister(child.conn)
        if not ended:
            return  # a client sends nothing after its request: ignore it, keep the child
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:  # the child has not made its process group yet
            try:
                os.kill(pid, signal.SIGKILL)
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
        """Import the installed modules a child imported (in its order), so later children start with them."""
        guard = _InstalledOnly()
        sys.meta_path.insert(0, guard)
        try:
            for name in names:
                if name in sys.modules or name in self.cold or name.startswith("__") or "__main__" in name:
                    continue
                try:
                    importlib.import_module(name)
                except BaseException:  # noqa: BLE001 - user code, or a module that only imports in context: cold
                    self.cold.add(name)
        finally:
            sys.meta_path.remove(guard)
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


def _parse_request(body: bytes) -> dict:
    """The request in ``body``: exactly the fields a client sends; ValueError otherwise."""
    request = json.loads(body.decode("utf-8", "surrogateescape"))
    if not isinstance(request, dict) or set(request) != set(_REQUEST_FIELDS):
        raise ValueError(f"malformed request: the fields must be {sorted(_REQUEST_FIELDS)}")
    if not all(isinstance(request[name], kind) for name, kind in _REQUEST_FIELDS.items()):
        raise ValueError("malformed request: a field of the wrong type")
    known = set(_RLIMITS.values())
    if not request["argv"] or not all(isinstance(arg, str) for arg in request["argv"]):
        raise ValueError("malformed request: argv must be a list of strings")
    if not all(isinstance(v, str) for v in request["env"].values()):
        raise ValueError("malformed request: env must map names to strings")
    for name, limit in request["rlimits"].items():
        if name not in known or not isinstance(limit, list) or len(limit) != 2:
            raise ValueError(f"malformed request: rlimit {name}")
    return request


def _limits_fit(rlimits: Dict[str, List[int]]) -> bool:
    """True where a child of this server can take each of the client's resource limits (no hard limit raised)."""
    for name, (_, hard) in rlimits.items():
        ours = resource.getrlimit(getattr(resource, name))[1]
        if ours != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > ours):
            return False
    return True


def _cuda_initialized() -> bool:
    """True where the server's torch has CUDA initialised: a forked child could not use it."""
    torch = sys.modules.get("torch")
    try:
        return torch is not None and bool(torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a torch without torch.cuda: assume the worst
        return True


class _UserCode(BaseException):
    """Raised into a preload that reached a module outside :func:`installed_roots` (no ``except Exception`` hides it)."""


class _InstalledOnly:
    """Meta path finder for preloads: finds modules as the others do, but refuses any outside installed code."""

    def __init__(self) -> None:
        self.roots = installed_roots()

    def find_spec(self, name: str, path: Optional[Sequence[str]], target: object = None) -> Optional[ModuleSpec]:
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(name, path, target)
            if spec is not None:
                if not self._installed(spec):
                    raise _UserCode(name)
                return spec
        return None

    def _installed(self, spec: ModuleSpec) -> bool:
        if spec.origin in ("built-in", "frozen"):
            return True
        paths = [spec.origin] if spec.has_location and spec.origin else list(spec.submodule_search_locations or [])
        return bool(paths) and all(os.path.realpath(p).startswith(self.roots) for p in paths)


def installed_roots() -> Tuple[str, ...]:
    """Directories whose modules the server may import: the standard library, site-packages, ``espnet3_rules``."""
    paths = {sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        paths.add(site.getusersitepackages())
    paths.add(str(Path(__file__).resolve().parents[1]))
    return tuple(os.path.join(os.path.realpath(p), "") for p in paths)


def _child_main(entry: Entry, request: dict, fds: List[int], report_w: int) -> None:
    """In the forked child: become the client's process, run the command, report, exit."""
    code = 1
    try:
        _fresh_atexit()
        os.setpgid(0, 0)
        _die_with_parent()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        for std_fd, fd in enumerate(fds):
            os.dup2(fd, std_fd)
        os.closerange(3, report_w)  # the server's sockets, pidfds and pipes, and the passed originals
        os.closerange(report_w + 1, 1 << 20)
        os.umask(request["umask"])
        for name, limit in request["rlimits"].items():
            resource.setrlimit(getattr(resource, name), tuple(limit))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _reopen_std_streams(request["env"])
        _reseed_global_generators()
        sys.argv = list(request["argv"])
        code = entry(sys.argv[1:])
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


def _reseed_global_generators() -> None:
    """Fresh entropy for the global generators that the server imported (a fork copies their state)."""
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()  # CUDA's generators are seeded lazily: CUDA is not initialised here


def _fresh_atexit() -> None:
    """Drop the server's ``atexit`` handlers but the stdlib's per-process ones that a fresh import would register."""
    atexit._clear()
    for module, handler in (("logging", "shutdown"), ("multiprocessing.util", "_exit_function")):
        if module in sys.modules:  # imported in the server, so the child's import will not register it
            atexit.register(getattr(sys.modules[module], handler))


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


def serve(sock_path: Path, entry: Entry) -> None:
    """Listen on ``sock_path``, say ``ready`` on stdout, then run requests as ``entry(argv)`` until idle."""
    server = ForkServer(sock_path, entry)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.close(devnull)
    server.serve()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m espnet3_rules.cli.forkserver SOCKET``: serve ``espnet3_rules.cli.main.main`` until idle."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m espnet3_rules.cli.forkserver SOCKET", file=sys.stderr)
        return 2
    from espnet3_rules.cli.main import main as cli_main

    serve(Path(args[0]), cli_main)
    return 0


if __name__ == "__main__":
    sys.exit(main())
