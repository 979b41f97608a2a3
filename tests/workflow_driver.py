"""Shared test driver: ``snakemake`` on the repo's Snakefile and ``python -m espnet3_rules`` in temp dirs."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional

import yaml

import faults
from toys import snapshot

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def job(name, n_items=10, n_shards=3, **extra):
    """A PoisonTextRunner job entry writing under results/<name>."""
    entry = {
        "runner": "toys.PoisonTextRunner",
        "provider": "toys.PoisonWordsProvider",
        "provider_config": {"n_items": n_items, "poison_dir": "poison"},
        "output_dir": "results",
        "shard_subdir": name,
        "n_shards": n_shards,
        "items": n_items,
    }
    entry.update(extra)
    return entry


def inference_job(name, n_items, n_shards):
    """An InferenceRunner job writing hyp.scp and n_chars.scp under results/<name>."""
    return {
        "runner": "espnet3_rules.InferenceRunner",
        "provider": "toys.UttProvider",
        "provider_config": {"n_items": n_items},
        "runner_kwargs": {"input_key": "text", "output_fn": "toys.hyp_fields"},
        "output_dir": "results",
        "shard_subdir": name,
        "n_shards": n_shards,
    }


def expected_text(n_items, suffix=""):
    """The merged ``text`` of a PoisonTextRunner job over ``n_items`` items."""
    return "".join(f"{i} W{i:04d}{suffix.upper()}\n" for i in range(n_items))


@functools.lru_cache(maxsize=None)
def slurm_controller_down() -> bool:
    """True where SLURM's client tools are installed but no slurmctld answers ``scontrol ping`` (at once)."""
    if shutil.which("scontrol") is None:
        return False
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=30).returncode != 0
    except subprocess.TimeoutExpired:
        return True


def python_env(fault_specs: Iterable[str] = ()) -> Dict[str, str]:
    """Environment for subprocesses: the toys importable; fault injection armed if specs are given.

    Where no slurmctld answers, ``tests/noslurm/scontrol`` (fails at once) comes first on ``PATH``:
    Snakemake's SLURM executor plugin runs ``scontrol show config`` (up to 10 s) at every start.
    """
    fault_specs = list(fault_specs)
    paths = [str(faults.SITE_DIR)] if fault_specs else []
    paths += [str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    if slurm_controller_down():
        env["PATH"] = os.pathsep.join([str(TESTS / "noslurm"), env.get("PATH", "")])
    env.pop(faults.ENV, None)
    if fault_specs:
        env[faults.ENV] = ";".join(fault_specs)
    return env


def cli(*args, cwd, fault_specs: Iterable[str] = (), **popen_kwargs) -> subprocess.CompletedProcess:
    """``python -m espnet3_rules ARGS`` in ``cwd`` (not checked: callers assert the return code)."""
    return subprocess.run(
        [sys.executable, "-m", "espnet3_rules", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, env=python_env(fault_specs), timeout=120, **popen_kwargs,
    )


class SnakemakeServer:
    """Client of ``snakemake_server.py``: ``snakemake`` runs forked from one process that imported it."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.runs = 0
        self.proc = subprocess.Popen([sys.executable, str(TESTS / "snakemake_server.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=python_env(), cwd=REPO)

    def run(self, argv) -> subprocess.CompletedProcess:
        """Run ``snakemake ARGV``; stdout holds its stdout and stderr together."""
        self.runs += 1
        out = self.scratch / f"run{self.runs}.out"
        self.proc.stdin.write(json.dumps({"argv": list(argv), "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        code = int(self.proc.stdout.readline())
        return subprocess.CompletedProcess(argv, code, out.read_text(encoding="utf-8", errors="replace"), "")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Workflow:
    """A temp working directory with its own config, driving ``snakemake`` on the repo's Snakefile."""

    def __init__(self, path: Path):
        self.path = path
        (path / "poison").mkdir(exist_ok=True)

    def write_config(self, jobs):
        (self.path / "config.yaml").write_text(yaml.safe_dump({"jobs": jobs}), encoding="utf-8")

    def arguments(self, *args):
        """snakemake's arguments: the repo's Snakefile, this directory, its config, then ``args``."""
        return ["-s", str(REPO / "Snakefile"), "-d", str(self.path), "--configfile", str(self.path / "config.yaml"),
                *args]

    def command(self, *args, fault_specs=()):
        """The snakemake command line and environment (run from the repo root, so ``--profile slurm`` resolves)."""
        return [sys.executable, "-m", "snakemake", *self.arguments(*args)], python_env(fault_specs)

    def snakemake(self, *args, check=True, fault_specs=(), server: Optional[SnakemakeServer] = None):
        """Run snakemake to the end (through ``server`` if given): ``(exit code, stdout + stderr)``."""
        if server is not None and not fault_specs:
            proc = server.run(self.arguments(*args))
        else:
            cmd, env = self.command(*args, fault_specs=fault_specs)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{out}")
        return proc.returncode, out

    def start(self, *args, fault_specs=(), **popen_kwargs) -> subprocess.Popen:
        """Start snakemake in the background (output in a pipe: read it with ``communicate``)."""
        cmd, env = self.command(*args, fault_specs=fault_specs)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                                **popen_kwargs)

    def poison(self, item):
        (self.path / "poison" / str(item)).touch()

    def cure(self, item):
        (self.path / "poison" / str(item)).unlink()


def job_counts(output: str) -> dict:
    """Rule -> count from Snakemake's 'Job stats' table (the first one printed)."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def assert_kept(before: Dict[str, bytes], root: Path) -> None:
    """Every file of ``before`` is still under ``root`` with the same bytes (new files are allowed)."""
    after = snapshot(root)
    lost = sorted(name for name in before if name not in after)
    changed = sorted(name for name in before if name in after and after[name] != before[name])
    assert not lost and not changed, f"lost: {lost}; changed: {changed}"
