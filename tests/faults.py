"""Test-only fault injection: SIGKILL a plan/shard/merge subprocess at a chosen point.

``ESPNET3_RULES_FAULT`` holds ``;``-separated entries ``POINT:GLOB[:N]``:

- POINT is a toy-runner hook (``open_writers``, ``forward``, ``write_record``, ``close_writers``,
  ``merge``, ``output_fn``) that calls :func:`at` / :func:`write`, or an engine call patched by
  :func:`install`: ``write_text`` (``Path.write_text``: the engine's JSON records ``manifest.json``,
  ``done`` and ``merge.done``, and ``field_keys.txt``, each into its temp file), ``copy``
  (``os.copy_file_range`` and ``shutil.copyfileobj``: one call per fragment appended), ``replace`` /
  ``replaced`` (before / after ``os.replace``).
- GLOB is matched (fnmatch) against the path the point writes; temp files ``.NAME.tmp.PID`` count as NAME.
- N picks the N-th matching call in the process (default 1).

Writes (``write_text``, ``copy``, ``write_record``, ``merge``) are torn: half the data is written and
flushed before the kill. ``tests/faultsite/sitecustomize.py`` calls :func:`install` in every
Python process started with that directory on ``PYTHONPATH`` and ``ESPNET3_RULES_FAULT`` set.
"""

from __future__ import annotations

import fnmatch
import os
import pathlib
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

ENV = "ESPNET3_RULES_FAULT"
SITE_DIR = Path(__file__).resolve().parent / "faultsite"
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp\.\d+$")


@dataclass
class Fault:
    """One entry of ``ESPNET3_RULES_FAULT``."""

    point: str
    glob: str
    nth: int = 1
    seen: int = 0


def spec(point: str, glob: str, nth: int = 1) -> str:
    """One ``ESPNET3_RULES_FAULT`` entry."""
    return f"{point}:{glob}:{nth}"


def parse(text: str) -> List[Fault]:
    """Entries of an ``ESPNET3_RULES_FAULT`` value."""
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        point, glob, *nth = entry.split(":")
        faults.append(Fault(point, glob, int(nth[0]) if nth else 1))
    return faults


_FAULTS = parse(os.environ.get(ENV, ""))


def logical_path(path: Any) -> str:
    """``path`` as a posix string, with a temp name ``.NAME.tmp.PID`` read as ``NAME``."""
    path = Path(os.fsdecode(path))
    match = _TMP_NAME.match(path.name)
    return (path.with_name(match["name"]) if match else path).as_posix()


def hit(point: str, path: Any) -> bool:
    """Count this call of ``point`` on ``path``; True if it is some fault's turn."""
    target = logical_path(path)
    turn = False
    for fault in _FAULTS:
        if fault.point == point and fnmatch.fnmatchcase(target, fault.glob):
            fault.seen += 1
            turn = turn or fault.seen == fault.nth
    return turn


def die() -> None:
    """SIGKILL this process (nothing after this line runs: no cleanup, no flush of open files)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def at(point: str, path: Any) -> None:
    """A fault point: die if it is this call's turn."""
    if hit(point, path):
        die()


def write(handle: Any, data: Any, point: str) -> None:
    """``handle.write(data)``, torn in half (then die) at the point's turn."""
    if hit(point, handle.name):
        handle.write(data[: len(data) // 2])
        handle.flush()
        die()
    handle.write(data)


def install() -> None:
    """Patch ``Path.write_text``, ``shutil.copyfileobj``, ``os.copy_file_range`` and ``os.replace``
    with fault points."""
    write_text, copy, replace = pathlib.Path.write_text, shutil.copyfileobj, os.replace

    def faulty_write_text(path: Path, data: str, encoding: Any = None, errors: Any = None, newline: Any = None) -> int:
        if not hit("write_text", path):
            return write_text(path, data, encoding=encoding, errors=errors, newline=newline)
        with open(path, "w", encoding=encoding, errors=errors, newline=newline) as handle:
            handle.write(data[: len(data) // 2])  # torn: half the text reaches the file
            handle.flush()
            die()
        return 0

    def faulty_copy(fsrc: Any, fdst: Any, length: int = 0) -> None:
        if not hit_name("copy", fdst):
            return copy(fsrc, fdst, length)
        write(fdst, fsrc.read(), "copy")

    def faulty_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        at("replace", dst)
        replace(src, dst, *args, **kwargs)
        at("replaced", dst)

    pathlib.Path.write_text, shutil.copyfileobj, os.replace = faulty_write_text, faulty_copy, faulty_replace
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is None:
        return

    def faulty_copy_range(src: int, dst: int, count: int, *args: Any) -> int:
        name = os.readlink(f"/proc/self/fd/{dst}")
        relative = os.path.relpath(name)  # as the engine names it: relative to the cwd when below it
        if not hit("copy", name if relative.startswith("..") else relative):
            return copy_range(src, dst, count, *args)
        copy_range(src, dst, max(count // 2, 1), *args)  # torn: half the bytes reach the file
        die()
        return 0

    os.copy_file_range = faulty_copy_range


def hit_name(point: str, handle: Any) -> bool:
    """True if some fault targets ``point`` on ``handle``'s file (:func:`write` counts the turn)."""
    name = getattr(handle, "name", None)
    if not isinstance(name, (str, bytes, os.PathLike)):
        return False
    target = logical_path(name)
    return any(f.point == point and fnmatch.fnmatchcase(target, f.glob) for f in _FAULTS)
