"""Resume and shard-lock programs written for ESPnet3: changed plans, a live lock, a run killed mid-shard.

Each ``program_*`` function takes a relative ``output_dir`` and returns what the user
would look at (see :mod:`espnet3_user.runners`). ``set_parallel`` is imported where a
program uses it, as ESPnet3 users do when they need a parallel config.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from espnet3.parallel.base_runner import BaseRunner
from espnet3.parallel.env_provider import EnvironmentProvider

from espnet3_user.data import WordModel, make_items

N_ITEMS = 7
#: Set in a child process (:func:`run_until_killed`): ``forward`` touches this file, then hangs.
HANG_FILE = None
#: The thread of :func:`program_live_lock_refused` whose ``forward`` holds its shard until released.
HOLDER = "holder"
STARTED = threading.Event()
RELEASE = threading.Event()


class WordsProvider(EnvironmentProvider):
    def build_env_local(self):
        return self.build_worker_setup_fn()()

    def build_worker_setup_fn(self):
        n_items = int(self.config["n_items"])

        def setup():
            return {"dataset": make_items(n_items), "model": WordModel()}

        return setup


def _hold():
    """Hang (child process) or wait for :data:`RELEASE` (holder thread); return at once otherwise."""
    if HANG_FILE is not None:
        Path(HANG_FILE).write_text("", encoding="utf-8")
        while True:
            time.sleep(60)
    if threading.current_thread().name == HOLDER and not STARTED.is_set():
        STARTED.set()
        RELEASE.wait(120)


class HypRunner(BaseRunner):
    """One ``<utt_id> <hyp>`` line per item in ``split.N/hyp``; merged into ``hyp``; merge returns the line count."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        _hold()
        items = [dataset[i] for i in (idx if isinstance(idx, list) else [idx])]
        return [(item["utt_id"], model(item["text"])) for item in items]

    @staticmethod
    def open_writers(shard_dir, **env):
        return {"hyp": (Path(shard_dir) / "hyp").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, **env):
        for utt_id, hyp in result:
            writers["hyp"].write(f"{utt_id} {hyp}\n")

    def merge(self, shard_dirs):
        lines = []
        for shard_dir in shard_dirs:
            lines.extend((Path(shard_dir) / "hyp").read_text(encoding="utf-8").splitlines(keepends=True))
        (Path(self.output_dir) / "hyp").write_text("".join(lines), encoding="utf-8")
        return len(lines)


def run(output_dir, indices=range(N_ITEMS), **kwargs):
    from omegaconf import OmegaConf

    provider = WordsProvider(OmegaConf.create({"n_items": N_ITEMS}))
    return HypRunner(provider, output_dir=output_dir, **kwargs)(indices)


def program_clean_run(output_dir):
    return run(output_dir)


def program_resume_changed_shard_count(output_dir):
    """First run locally (one shard); then a parallel config of 2 workers plans 2 shards."""
    from omegaconf import OmegaConf

    from espnet3.parallel.parallel import set_parallel

    run(output_dir)
    set_parallel(OmegaConf.create({"env": "local", "n_workers": 2}))
    return run(output_dir)


def program_resume_changed_items(output_dir):
    run(output_dir)
    return run(output_dir, range(N_ITEMS - 2))


def program_resume_changed_batching(output_dir):
    run(output_dir, batch_size=2)
    return run(output_dir, batch_size=3)


def program_changed_plan_without_resume(output_dir):
    run(output_dir)
    return run(output_dir, range(N_ITEMS - 2), resume=False)


def program_live_lock_refused(output_dir):
    """A second run on the same output dir while a first one (another thread) holds its shard."""
    STARTED.clear()
    RELEASE.clear()
    first = threading.Thread(target=run, args=(output_dir,), name=HOLDER)
    first.start()
    try:
        if not STARTED.wait(120):
            raise AssertionError("the first run never started its shard")
        return run(output_dir)
    finally:
        RELEASE.set()
        first.join()


def run_until_killed(output_dir, hang_file):
    """Child process: run, and hang inside the first ``forward`` (see :data:`HANG_FILE`)."""
    global HANG_FILE
    HANG_FILE = hang_file
    run(output_dir)


def kill_mid_shard(output_dir):
    """Run in a child process and SIGKILL it while it is inside its shard."""
    hang_file = Path(f"{output_dir}.hanging").resolve()
    code = f"import {__name__} as m; m.run_until_killed({str(output_dir)!r}, {str(hang_file)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(1200):
            if hang_file.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        if not hang_file.exists():
            raise AssertionError(f"the child run never reached forward (exit {child.poll()})")
    finally:
        child.kill()
        child.wait()


def program_rerun_after_kill(output_dir):
    kill_mid_shard(output_dir)
    return run(output_dir)


def program_allow_overwrite_lock_after_kill(output_dir):
    """After a kill, ``parallel.allow_overwrite_lock: true`` (ESPnet3 then runs its shard through Dask)."""
    from omegaconf import OmegaConf

    from espnet3.parallel.parallel import set_parallel

    kill_mid_shard(output_dir)
    set_parallel(OmegaConf.create({
        "env": "local", "n_workers": 1, "allow_overwrite_lock": True,
        "options": {"processes": False, "threads_per_worker": 1, "dashboard_address": None},
    }))  # fmt: skip
    return run(output_dir)
