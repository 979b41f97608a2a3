"""Distinct GPUs for shards that run concurrently on one machine.

Snakemake's ``--resources gpu=N`` only bounds how many GPUs running jobs ask
for; it does not say *which* GPU a job gets. A shard that asks for ``gpu: k``
takes ``k`` free slots here (``fcntl`` locks under ``.snakemake/gpu_slots``,
released when the process exits, even by SIGKILL) and sees only those GPUs
through ``CUDA_VISIBLE_DEVICES``. Inside a SLURM job nothing is allocated: SLURM
already set ``CUDA_VISIBLE_DEVICES`` to the job's own GPUs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

from .contracts import ContractError

GPUS_ENV = "ESPNET3_RULES_GPUS"  # local GPU ids ("0,1,3") or a count ("4")
SLOT_DIR_ENV = "ESPNET3_RULES_GPU_SLOT_DIR"  # default .snakemake/gpu_slots
DEFAULT_SLOT_DIR = Path(".snakemake") / "gpu_slots"


def local_gpu_ids() -> List[str]:
    """GPU ids shards may take: ``$ESPNET3_RULES_GPUS``, else ``$CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``."""
    configured = os.environ.get(GPUS_ENV, "").strip() or os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if configured:
        return [str(i) for i in range(int(configured))] if configured.isdigit() else configured.split(",")
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def _try_lock(path: Path) -> Optional[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def gpu_slots(n_gpus: int, slot_dir: Optional[Path] = None, poll_s: float = 0.5) -> Iterator[str]:
    """Hold ``n_gpus`` local GPUs for the ``with`` block; yields the torch device string.

    ``cpu`` when ``n_gpus`` is 0; ``cuda:0`` otherwise (the first of the GPUs made
    visible). Waits while every slot is taken by other shards.
    """
    if n_gpus <= 0:
        yield "cpu"
        return
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("CUDA_VISIBLE_DEVICES"):  # SLURM already chose
        yield "cuda:0"
        return
    ids = local_gpu_ids()
    if len(ids) < n_gpus:
        raise ContractError(
            f"the shard asks for gpu={n_gpus} but this machine offers {len(ids)} GPU(s) "
            f"(set {GPUS_ENV} or lower resources.gpu)"
        )
    slot_dir = Path(slot_dir or os.environ.get(SLOT_DIR_ENV) or DEFAULT_SLOT_DIR)
    slot_dir.mkdir(parents=True, exist_ok=True)
    while True:
        with ExitStack() as held:
            taken: List[str] = []
            for gpu in ids:
                fd = _try_lock(slot_dir / f"gpu{gpu}.lock")
                if fd is not None:
                    held.callback(os.close, fd)
                    taken.append(gpu)
                    if len(taken) == n_gpus:
                        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(taken)
                        yield "cuda:0"
                        return
        time.sleep(poll_s)  # all partial locks released above: no two shards deadlock
