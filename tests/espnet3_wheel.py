"""The reference ESPnet3: the ``espnet`` wheel from PyPI, downloaded at test time, never vendored.

:func:`espnet3_path` downloads ``espnet==<version>`` with pip (once) and unpacks the
wheel's ``espnet3/`` and ``espnet2/`` packages into ``<cache>/espnet-<version>/``;
putting that directory on ``sys.path`` / ``PYTHONPATH`` makes ``import espnet3``
work. ``bench/run_bench.py`` uses the same function.

:func:`espnet3_root` is a session-scoped pytest fixture over it (cache:
``tests/.cache``, git-ignored): it skips the tests that use it when the wheel cannot
be had (no network, no index) or ESPnet3's imports are missing, unless ``CI`` is
set, where it fails instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

DEFAULT_VERSION = "202611"
PACKAGES = ("espnet3", "espnet2")  # the wheel's top-level packages that are unpacked
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
#: Modules ``espnet3.systems.base.inference_runner`` (and ``base_runner``) import, besides the wheel's own.
REQUIRED_MODULES = ("torch", "numpy", "omegaconf", "typeguard", "hydra", "soundfile", "tqdm")
#: Files whose presence means an unpacked tree is complete (it is renamed into place only when whole).
_MARKERS = ("espnet3/parallel/base_runner.py", "espnet3/systems/base/inference_runner.py", "espnet2/__init__.py")


class Espnet3Unavailable(RuntimeError):
    """The espnet wheel could not be downloaded or unpacked."""


def _complete(root: Path) -> bool:
    return all((root / marker).is_file() for marker in _MARKERS)


def _download(version: str, dest: Path, timeout: float) -> Path:
    """``pip download espnet==version`` (the wheel alone) into ``dest``; the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", f"espnet=={version}", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--disable-pip-version-check", "-d", str(dest), "--quiet",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Espnet3Unavailable(f"cannot download espnet=={version}: {' '.join(cmd)}: {exc}") from exc
    wheels = sorted(dest.glob(f"espnet-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise Espnet3Unavailable(
            f"cannot download espnet=={version} (pip exit {proc.returncode}; needs PyPI or a pip index/find-links "
            f"that has it): {' '.join(cmd)}\n{tail}"
        )
    return wheels[0]


def _unpack(wheel: Path, dest: Path, packages: Sequence[str]) -> None:
    prefixes = tuple(f"{p}/" for p in packages)
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(dest, [n for n in archive.namelist() if n.startswith(prefixes)])
    except (OSError, zipfile.BadZipFile) as exc:
        raise Espnet3Unavailable(f"cannot unpack {wheel}: {exc}") from exc


def espnet3_path(cache_dir, version: str = DEFAULT_VERSION, timeout: float = 600) -> Path:
    """Directory holding the ``espnet3/`` and ``espnet2/`` packages of the ``espnet==version`` wheel.

    The first call downloads the wheel (pip, no dependencies) and unpacks those two
    packages into ``<cache_dir>/espnet-<version>/``; later calls return that
    directory at once. The tree is unpacked into a temporary directory beside it and
    renamed into place whole, so processes racing on an empty cache each download,
    one rename wins, and no process ever sees a half-unpacked tree. An incomplete
    tree left there by something else (e.g. an older layout without ``espnet2/``) is
    replaced.

    Raises:
        Espnet3Unavailable: the wheel cannot be downloaded (no network or index) or unpacked.
    """
    cache_dir = Path(cache_dir).resolve()
    root = cache_dir / f"espnet-{version}"
    if _complete(root):
        return root
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".espnet-{version}.", dir=cache_dir))
    except OSError as exc:
        raise Espnet3Unavailable(f"cannot create the cache directory {cache_dir}: {exc}") from exc
    try:
        wheel = _download(version, work / "wheel", timeout)
        tree = work / "tree"
        _unpack(wheel, tree, PACKAGES)
        if not _complete(tree):
            missing = [m for m in _MARKERS if not (tree / m).is_file()]
            raise Espnet3Unavailable(f"{wheel.name} lacks {missing}")
        for _ in range(3):
            try:
                os.rename(tree, root)  # atomic; fails if root exists and is not empty
                return root
            except OSError:
                if _complete(root):  # another process won the race
                    return root
                if root.exists():  # incomplete leftover: move it aside (atomically), then retry
                    try:
                        os.rename(root, work / "stale")
                    except OSError:
                        pass
        if _complete(root):
            return root
        raise Espnet3Unavailable(f"cannot move the unpacked wheel into {root}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def missing_modules(names: Sequence[str] = REQUIRED_MODULES) -> list:
    """Those of ``names`` that cannot be imported here."""
    return [name for name in names if importlib.util.find_spec(name) is None]


try:
    import pytest
except ImportError:  # bench/run_bench.py imports this module without pytest installed
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def espnet3_root():
        """The unpacked reference ESPnet3 (see :func:`espnet3_path`), put first on ``sys.path``.

        Skips when it cannot be had, or its imports are missing; fails instead if ``CI`` is set.
        """
        problem = None
        missing = missing_modules()
        if missing:
            problem = f"ESPnet3 {DEFAULT_VERSION} needs modules that are not installed: {', '.join(missing)}"
        else:
            try:
                root = espnet3_path(CACHE_DIR)
            except Espnet3Unavailable as exc:
                problem = f"reference ESPnet3 unavailable: {exc}"
        if problem is not None:
            if os.environ.get("CI"):
                pytest.fail(f"{problem} (CI is set: the ESPnet3 reference tests must run)", pytrace=False)
            pytest.skip(problem)
        sys.path.insert(0, str(root))
        try:
            yield root
        finally:
            if str(root) in sys.path:
                sys.path.remove(str(root))
