"""Distinct GPUs for shards that run concurrently on one machine.

Snakemake's ``--resources gpu=N`` only bounds how many GPUs running jobs ask
for; it does not say *which* GPU a job gets. A shard that asks for ``gpu: k``
takes ``k`` free slots here (``fcntl`` locks under ``.snakemake/gpu_slots``,
released when the process exits, even by SIGKILL) and sees only those GPUs
through ``CUDA_VISIBLE_DEVICES``.

Inside a SLURM job, SLURM already set ``CUDA_VISIBLE_DEVICES`` to the job's
own GPUs: a shard that asks for exactly those takes them without any lock. Only
when the job holds more GPUs than the shard asks for (a group job bundling
several GPU shards) do its shards split them, with locks in a node-local
directory of that job.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

from espnet3_rules.engine.contracts import ContractError

GPUS_ENV = "ESPNET3_RULES_GPUS"  # local GPU ids ("0,1,3") or a count ("4")
SLOT_DIR_ENV = "ESPNET3_RULES_GPU_SLOT_DIR"  # default .snakemake/gpu_slots
DEFAULT_SLOT_DIR = Path(".snakemake") / "gpu_slots"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def visible_ids(value: str) -> List[str]:
    """GPU ids in a ``CUDA_VISIBLE_DEVICES`` value; CUDA ignores everything from the first invalid entry on."""
    ids: List[str] = []
    for token in (t.strip() for t in value.split(",")):
        if not token or token.startswith("-") or token == "NoDevFiles":
            break
        ids.append(token)
    return ids


def nvidia_smi_ids() -> List[str]:
    """Indices of the GPUs ``nvidia-smi -L`` lists (none without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE)


def local_gpu_ids() -> List[str]:
    """GPU ids shards may take: ``$ESPNET3_RULES_GPUS``, else ``$CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``."""
    configured = os.environ.get(GPUS_ENV, "").strip()
    if configured:
        return [str(i) for i in range(int(configured))] if configured.isdigit() else visible_ids(configured)
    if VISIBLE_ENV in os.environ:
        return visible_ids(os.environ[VISIBLE_ENV])
    return nvidia_smi_ids()


def _try_lock(path: Path) -> Optional[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_name(gpu: str) -> str:
    return "gpu" + re.sub(r"[^A-Za-z0-9._-]", "_", gpu) + ".lock"  # MIG ids may hold '/'


@contextmanager
def _take(ids: List[str], n_gpus: int, slot_dir: Path, poll_s: float) -> Iterator[None]:
    """Lock ``n_gpus`` of ``ids`` (waiting while too few are free); they are visible inside the block."""
    slot_dir.mkdir(parents=True, exist_ok=True)
    while True:
        with ExitStack() as held:
            taken: List[str] = []
            for gpu in ids:
                fd = _try_lock(slot_dir / _lock_name(gpu))
                if fd is not None:
                    held.callback(os.close, fd)
                    taken.append(gpu)
                    if len(taken) == n_gpus:
                        with _visible(taken):
                            yield
                        return
        time.sleep(poll_s)  # all partial locks released above: no two shards deadlock


@contextmanager
def _visible(ids: List[str]) -> Iterator[None]:
    """Set ``CUDA_VISIBLE_DEVICES`` to ``ids`` for the block, then restore it."""
    before = os.environ.get(VISIBLE_ENV)
    os.environ[VISIBLE_ENV] = ",".join(ids)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VISIBLE_ENV, None)
        else:
            os.environ[VISIBLE_ENV] = before


@contextmanager
def gpu_slots(n_gpus: int, slot_dir: Optional[Path] = None, poll_s: float = 0.5) -> Iterator[str]:
    """Hold ``n_gpus`` GPUs for the ``with`` block; yields the torch device string.

    ``cpu`` when ``n_gpus`` is 0; ``cuda:0`` otherwise (the first of the GPUs made
    visible). Waits while every slot is taken by other shards.
    """
    if n_gpus <= 0:
        yield "cpu"
        return
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if slurm_job:
        ids = visible_ids(os.environ.get(VISIBLE_ENV, ""))
        if len(ids) < n_gpus:
            raise ContractError(
                f"the shard asks for gpu={n_gpus} but SLURM job {slurm_job} holds {len(ids)} GPU(s) "
                f"({VISIBLE_ENV}={os.environ.get(VISIBLE_ENV, '<unset>')}); the shard's gpu resource must reach sbatch"
            )
        if len(ids) == n_gpus:  # SLURM already chose exactly this shard's GPUs
            yield "cuda:0"
            return
        default_dir = Path(tempfile.gettempdir()) / f"espnet3-rules-gpu-slots-{slurm_job}"  # node-local, per job
    else:
        ids = local_gpu_ids()
        if len(ids) < n_gpus:
            raise ContractError(
                f"the shard asks for gpu={n_gpus} but this machine offers {len(ids)} GPU(s) "
                f"(set {GPUS_ENV} or lower resources.gpu)"
            )
        default_dir = DEFAULT_SLOT_DIR
    with _take(ids, n_gpus, Path(slot_dir or os.environ.get(SLOT_DIR_ENV) or default_dir), poll_s):
        yield "cuda:0"
