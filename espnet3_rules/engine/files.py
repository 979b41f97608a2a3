"""File helpers of the engine: the one atomic writer, JSON records, shard-file concatenation."""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence

#: Errors with which the kernel refuses ``copy_file_range`` between two files (the copy then
#: goes through Python buffers): no such call, across file systems, not for this file system
#: or file, blocked by a seccomp filter.
_COPY_RANGE_REFUSED = frozenset(
    {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM}
)
COPY_BLOCK = 1 << 20


def temp_path(path: Path) -> Path:
    """The temp file beside ``path`` that this process writes before renaming it onto ``path``."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def atomic_path(path: Any, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; renamed onto ``path`` on success, removed on error.

    Readers never see half a file. With ``durable``, the file and the rename are
    fsynced (markers and manifests; bulk data is not, as ``cat`` and Kaldi do not).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if durable:
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: Any, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically and durably."""
    with atomic_path(path, durable=True) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def append_file(path: Path, out: BinaryIO) -> None:
    """Append the bytes of ``path`` to the binary file ``out`` (opened for writing).

    The kernel copies them (``os.copy_file_range``: no trip through Python) where it
    can; where it refuses (see ``_COPY_RANGE_REFUSED``) or stops short, the rest is
    copied with ``shutil.copyfileobj`` from the offset reached.
    """
    with Path(path).open("rb") as src:
        size = os.fstat(src.fileno()).st_size
        copied = 0
        copy_range = getattr(os, "copy_file_range", None)
        if copy_range is not None and size:
            out.flush()  # the kernel appends at the file offset: nothing may wait in out's buffer
            try:
                while copied < size:
                    n = copy_range(src.fileno(), out.fileno(), size - copied, copied)
                    if n == 0:
                        break
                    copied += n
            except OSError as exc:
                if exc.errno not in _COPY_RANGE_REFUSED:
                    raise
        if copied < size:
            src.seek(copied)
            shutil.copyfileobj(src, out, COPY_BLOCK)
            out.flush()


def concatenate_to_temp(fragments: Sequence[Path], out_path: Path, stop: Optional[Callable[[], bool]] = None) -> Path:
    """Write ``fragments`` concatenated to a temp file beside ``out_path`` and return its path.

    The caller renames it onto ``out_path`` (``os.replace``). The temp file is
    removed if copying fails, or if ``stop()`` turns true between fragments (then
    :class:`InterruptedError` is raised).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out_path)
    try:
        with tmp.open("wb") as out:
            for fragment in fragments:
                if stop is not None and stop():
                    raise InterruptedError(f"concatenation into {out_path} stopped")
                append_file(fragment, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def concatenate_shard_files(shard_dirs: Sequence[Path], relative_name: str, out_path: Path) -> bool:
    """Concatenate ``<shard_dir>/<relative_name>`` across ``shard_dirs`` (in the given order).

    As ESPnet3's helper of the same name, with the output written to a temp file
    and renamed, so a killed merge never leaves a half-written ``out_path``.

    Args:
        shard_dirs: Completed shard directories, in the order to concatenate.
        relative_name: File name inside each shard directory (e.g. ``hyp.scp``).
        out_path: The merged file.

    Returns:
        ``False`` (and ``out_path`` removed) if no shard has the fragment, else ``True``.
    """
    out_path = Path(out_path)
    fragments = [Path(d) / relative_name for d in shard_dirs]
    fragments = [f for f in fragments if f.exists()]
    if not fragments:
        out_path.unlink(missing_ok=True)
        return False
    os.replace(concatenate_to_temp(fragments, out_path), out_path)
    return True
