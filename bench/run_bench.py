#!/usr/bin/env python
"""Benchmarks of espnet3-rules against a bare loop, ESPnet3 on Dask, and ``cat``.

    python bench/run_bench.py                 # everything, medians of 3 runs (ESPnet3 fetched on first use)
    python bench/run_bench.py --quick --no-espnet --parts inshard,plan,merge   # smoke run, seconds

Parts (each prints one or more table rows with a ratio and its target):

- ``inshard``  run_shard on one shard vs a bare loop calling the same forward with the same env.
- ``workflow`` ``snakemake --cores 2`` (16 shards) vs ESPnet3's BaseRunner on a Dask LocalCluster
  with 2 workers: the same user classes (``bench/espnet3_user.py``), only their import lines differ.
- ``rerun``    Snakemake rerun after one of the shards failed vs the full run.
- ``plan``     ``snakemake -n`` for 1,000 and 10,000 shards vs ``bench/bare.smk`` (bare Snakemake, the same
  DAG shape: plan -> N shards -> merge -> report item of ``touch`` rules, no package code).
- ``local``    ``snakemake --cores 2`` of 100 one-item shards vs the bare Snakefile's 100 ``touch`` jobs.
- ``scale``    plan, manifest.json, shards and merge in-process at 10,000 x 1,000 and 100,000 x 10,000
  (items x shards): each step's time against linear growth from the smaller size.
- ``merge``    InferenceRunner.merge / concatenate_shard_files of ~1 GB of shard text vs ``cat``.
- ``resume``   a shard SIGKILLed at 90 % of its items, then rerun: the share of its items the rerun computes.

ESPnet3 is never vendored: its wheel is downloaded with pip and unpacked into ``bench/.cache``,
and dask is installed into the benchmark's own venv ``bench/.venv`` (both git-ignored).
Scratch work goes to a temp dir that is removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import resource
import shutil
import signal
import site
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))  # this checkout's espnet3_rules, whatever is installed
USER_TEMPLATE = BENCH / "espnet3_user.py"
BARE_SNAKEFILE = BENCH / "bare.smk"  # the reference of the plan and local parts: the same DAG, `touch` rules
RULES_USER = "rules_user"  # module name of the espnet3_rules copy of the user code
ESPNET3_USER = "espnet3_user"
IMPORT_SWITCH = {
    "from espnet3.parallel.base_runner import": "from espnet3_rules.parallel.base_runner import",
    "from espnet3.parallel.env_provider import": "from espnet3_rules.parallel.env_provider import",
}
ESPNET3_BENCH_DEPS = ["dask[distributed]==2026.8.0", "dask-jobqueue==0.9.0", "typeguard==4.6.1"]
PARTS = ("inshard", "workflow", "rerun", "plan", "local", "scale", "merge", "resume")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one benchmark run."""

    inshard_items: int = 100_000
    utts: int = 2_000  # tone-ASR test set of the workflow and rerun parts
    shards: int = 16  # of the workflow and rerun parts
    extra_shards: Sequence[int] = (2,)  # further workflow rows: as many shards as ESPnet3 makes (one per worker)
    batch_size: int = 4
    workers: int = 2  # snakemake --cores and Dask LocalCluster n_workers
    plan_shards: Sequence[int] = (1_000, 10_000)
    plan_items: int = 100_000
    local_shards: int = 100  # trivial shards of the local part (one item each)
    scale: Sequence[Tuple[int, int]] = ((10_000, 1_000), (100_000, 10_000))  # (items, shards) of the scale part
    merge_bytes: int = 1_000_000_000
    merge_shards: int = 16
    resume_items: int = 10_000
    repeats: int = 3


QUICK = Sizes(
    inshard_items=20_000, utts=16, shards=4, extra_shards=(), plan_shards=(10, 100), plan_items=1_000,
    local_shards=8, scale=((1_000, 10), (10_000, 100)), merge_bytes=16_000_000, resume_items=1_000, repeats=1,
)  # fmt: skip


@dataclass
class Row:
    """One table row: ours vs a reference, as medians of seconds (or items/s where noted)."""

    part: str
    ours: str
    ours_s: float
    ref: str
    ref_s: Optional[float]
    ratio: Optional[float]
    target: str
    met: Optional[bool]
    note: str = ""
    samples: Dict[str, List[float]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def median(values: Sequence[float]) -> float:
    """Median of measured values."""
    return statistics.median(values)


def run(cmd: Sequence[str], env: Dict[str, str], cwd: Path, log: Path, check: bool = True) -> float:
    """Run ``cmd`` with stdout/stderr to ``log``; return its wall time in seconds."""
    return run_cpu(cmd, env, cwd, log, check)[0]


def run_cpu(cmd: Sequence[str], env: Dict[str, str], cwd: Path, log: Path, check: bool = True) -> Tuple[float, float]:
    """Run ``cmd`` as :func:`run` does; its wall time and the CPU time (user + system) of it and
    the children it waited for, in seconds (a fork server's children are not among them)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.run(list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if check and proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); log {log}:\n{tail}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def pythonpath(*dirs: Path) -> str:
    """``PYTHONPATH`` with ``dirs`` first, then this checkout, then the caller's."""
    parts = [str(d) for d in dirs] + [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(parts)


def switch_imports(source: str) -> str:
    """The ESPnet3 user code with its import lines pointed at espnet3_rules (nothing else changes)."""
    for old, new in IMPORT_SWITCH.items():
        if old not in source:
            raise RuntimeError(f"{USER_TEMPLATE}: expected an import line starting {old!r}")
        source = source.replace(old, new)
    return source


def write_rules_user(directory: Path) -> Path:
    """Write ``rules_user.py`` (the switched copy of the user code) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{RULES_USER}.py"
    path.write_text(switch_imports(USER_TEMPLATE.read_text(encoding="utf-8")), encoding="utf-8")
    return path


def write_scontrol_stub(directory: Path) -> Path:
    """A ``scontrol`` that fails at once, to put first on Snakemake's PATH.

    Importing snakemake-executor-plugin-slurm (every ``snakemake`` start, local runs
    too) runs ``scontrol show config`` wherever ``sinfo`` exists; with a SLURM client
    but no reachable controller that waits 9-60 s. These benchmarks run locally, so
    the probe is answered by this stub instead.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stub = directory / "scontrol"
    stub.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    stub.chmod(0o755)
    return directory


def interleaved(measures: Dict[str, Callable[[], float]], repeats: int) -> Dict[str, List[float]]:
    """Run each measurement ``repeats`` times, alternating their order between rounds."""
    names = list(measures)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            samples[name].append(measures[name]())
    return samples


def tool_version(module: str, python: str = sys.executable) -> str:
    """``module.__version__`` as seen by ``python`` (or 'absent')."""
    code = f"import {module}; print({module}.__version__)"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "absent"


def machine_info(espnet: Optional["Espnet3"]) -> Dict[str, Any]:
    """CPU, memory, load and versions, for the report."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    info = {
        "cpu": f"{cpu} x {os.cpu_count()}",
        "memory": f"{mem_kb / 2**20:.0f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "snakemake": tool_version("snakemake"),
        "torch": tool_version("torch"),
        "espnet3-rules commit": commit.stdout.strip() or "unknown",
        "load average (1/5/15 min) at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    if espnet is not None:
        info["espnet wheel"] = espnet.version
        info["dask / distributed (bench venv)"] = f"{tool_version('dask', espnet.python)} / {tool_version('distributed', espnet.python)}"
    return info


# ------------------------------------------------------------------------ ESPnet3 setup
@dataclass
class Espnet3:
    """An unpacked ESPnet3 wheel and a venv python with dask to run it."""

    version: str
    root: Path  # holds espnet3/ and espnet2/
    python: str

    def env(self, *dirs: Path) -> Dict[str, str]:
        """Environment for a process importing espnet3 and the user code in ``dirs``."""
        return dict(os.environ, PYTHONPATH=pythonpath(self.root, *dirs))


def load_wheel_helper():
    """``tests/espnet3_wheel.py``, the one download+unpack of the espnet wheel (the tests' too).

    Loaded from its file, not by putting ``tests/`` on ``sys.path``: that folder holds an
    ``espnet3_user`` package of its own, which would shadow this folder's ``espnet3_user``.
    """
    import importlib.util

    name = "espnet3_wheel"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "espnet3_wheel.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def running_site_dirs() -> List[str]:
    """The site-packages directories of the running interpreter (a venv's own, then its base's where it sees them)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def make_bench_venv(venv: Path) -> Path:
    """The bench venv's python: it sees every package of the running interpreter, whatever installed it.

    ``--system-site-packages`` alone would show only the *base* interpreter's packages, so with
    this project installed in a virtualenv the ESPnet3 side would miss omegaconf and the rest.
    A ``.pth`` file lists the running environment's site directories after the venv's own
    (where dask goes), and is rewritten when the running environment changes.
    """
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    pth = Path(own) / "_espnet3_rules_bench.pth"
    lines = "".join(f"{d}\n" for d in running_site_dirs())
    if not pth.exists() or pth.read_text(encoding="utf-8") != lines:
        pth.write_text(lines, encoding="utf-8")
    return python


def setup_espnet3(cache: Path, version: str, venv: Path) -> Espnet3:
    """Download and unpack the espnet wheel (``espnet3/``, ``espnet2/``) and make the bench venv with dask."""
    root = load_wheel_helper().espnet3_path(cache, version)
    source = (root / "espnet3" / "parallel" / "base_runner.py").read_text(encoding="utf-8")
    if "def is_shard_done" not in source or "resume" not in source:
        raise RuntimeError(f"espnet {version}: espnet3/parallel/base_runner.py has no resume/done support")
    python = make_bench_venv(venv)
    if tool_version("distributed", str(python)) == "absent" or tool_version("dask_jobqueue", str(python)) == "absent":
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *ESPNET3_BENCH_DEPS], check=True)
    return Espnet3(version=version, root=root, python=str(python))


def espnet3_main(argv: Sequence[str]) -> int:
    """Run the tone-ASR decode with ESPnet3's BaseRunner on a Dask LocalCluster (in the bench venv)."""
    parser = argparse.ArgumentParser(prog="run_bench.py _espnet3")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    import espnet3_user as user
    from espnet3.parallel.parallel import set_parallel
    from espnet3_rules.examples.tone_asr import KaldiDataset

    set_parallel(OmegaConf.create({"env": "local", "n_workers": args.workers, "options": {}}))
    provider = user.ToneDecodeProvider(OmegaConf.create({"data_dir": args.data_dir}))
    runner = user.ToneDecodeRunner(provider, batch_size=args.batch_size, output_dir=args.output_dir, shard_subdir="decode")
    runner(range(len(KaldiDataset(args.data_dir))))
    return 0


# ------------------------------------------------------------------------- workloads
class Workspace:
    """Scratch directory of one benchmark run: user modules, data, Snakemake work dirs."""

    def __init__(self, root: Path, cache: Path, sizes: Sizes):
        self.root, self.cache, self.sizes = root, cache, sizes
        self.user_dir = root / "user"
        write_rules_user(self.user_dir)
        self.stub_dir = write_scontrol_stub(root / "bin")
        self.run_dir = root / "run"  # the fork servers' sockets (XDG_RUNTIME_DIR of every Snakemake run)
        self.run_dir.mkdir()
        self._count = 0

    def fresh_dir(self, name: str) -> Path:
        """A new, empty directory under the workspace."""
        self._count += 1
        path = self.root / f"{self._count:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def tone_data(self) -> Path:
        """The tone-ASR test set (cached across runs; utterance i depends only on the seed and i)."""
        data = self.cache / f"tone_test_{self.sizes.utts}"
        if not (data / "wav.scp").exists():
            from espnet3_rules.examples.tone_asr import prepare_data

            prepare_data(data, n_utts=self.sizes.utts, seed=0)
        return data

    def snakemake_env(self, **extra: str) -> Dict[str, str]:
        """Environment of a Snakemake run that imports the switched user code (``scontrol`` stubbed)."""
        path = os.pathsep.join([str(self.stub_dir), os.environ.get("PATH", "")])
        return dict(os.environ, PYTHONPATH=pythonpath(self.user_dir), PATH=path, XDG_RUNTIME_DIR=str(self.run_dir), **extra)

    def stop_fork_servers(self) -> None:
        """End the fork servers of earlier runs, so that the next run starts cold as a first run does."""
        subprocess.run(["pkill", "-f", str(self.run_dir)], check=False)
        deadline = time.monotonic() + 10
        while subprocess.run(["pgrep", "-f", str(self.run_dir)], capture_output=True).returncode == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fork servers under {self.run_dir} did not stop")
            time.sleep(0.05)

    def snakemake(self, workdir: Path, jobs: Dict[str, Any], *args: str, check: bool = True, log: str = "snakemake.log",
                  env: Optional[Dict[str, str]] = None) -> float:
        """Write ``workdir/config.yaml`` and time ``snakemake`` on the project's Snakefile there."""
        return self.ours_snakemake(workdir, jobs, *args, check=check, log=log, env=env)[0]

    def bare_snakemake(self, workdir: Path, n_shards: int, *args: str) -> Tuple[float, float]:
        """Time ``snakemake`` on :data:`BARE_SNAKEFILE` (``n_shards`` shards) in ``workdir``: wall and CPU seconds."""
        cmd = [sys.executable, "-m", "snakemake", "-s", str(BARE_SNAKEFILE), "-d", str(workdir),
               "--config", f"n_shards={n_shards}", *args]  # fmt: skip
        return run_cpu(cmd, self.snakemake_env(), workdir, workdir / "snakemake.log")

    def ours_snakemake(self, workdir: Path, jobs: Dict[str, Any], *args: str, check: bool = True, log: str = "snakemake.log",
                       env: Optional[Dict[str, str]] = None) -> Tuple[float, float]:
        """Write ``workdir/config.yaml`` and run ``snakemake`` on the project's Snakefile there: wall and CPU seconds."""
        import yaml

        config = workdir / "config.yaml"
        config.write_text(yaml.safe_dump({"jobs": jobs}), encoding="utf-8")
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--configfile", str(config), *args]  # fmt: skip
        return run_cpu(cmd, self.snakemake_env(**(env or {})), workdir, workdir / log, check=check)

    def decode_job(self, data: Path, n_shards: int) -> Dict[str, Any]:
        """The tone-ASR decode job of the workflow and rerun parts."""
        return {
            "decode": {
                "runner": f"{RULES_USER}.ToneDecodeRunner",
                "provider": f"{RULES_USER}.ToneDecodeProvider",
                "provider_config": {"data_dir": str(data)},
                "n_shards": n_shards,
                "batch_size": self.sizes.batch_size,
                "items": self.sizes.utts,  # ESPnet3's caller passes range(n) too
                "output_dir": "results",
                "shard_subdir": "decode",
                "inputs": [str(data / "wav.scp")],
            }
        }

    def run_decode(self, data: Path, n_shards: int, workdir: Path, *args: str, check: bool = True, log: str = "snakemake.log",
                   env: Optional[Dict[str, str]] = None) -> float:
        """``snakemake --cores W`` of the decode job in ``workdir``, started without warm fork servers."""
        job = self.decode_job(data, n_shards)
        return self.snakemake(workdir, job, "--cores", str(self.sizes.workers), *args, check=check, log=log, env=env)


# ------------------------------------------------------------------------------ parts
def bench_inshard(ws: Workspace) -> List[Row]:
    """run_shard on one shard vs a bare loop over the same forward and env (trivial forward)."""
    sys.path.insert(0, str(ws.user_dir))
    import rules_user as user
    from omegaconf import OmegaConf

    from espnet3_rules.engine.job import shard_env
    from espnet3_rules.engine.plan import make_plan, write_manifest
    from espnet3_rules.engine.shard import build_worker_env, run_shard

    n = ws.sizes.inshard_items
    rows = []
    for runner_cls, keep_in_state in ((user.EchoRunner, True), (user.EchoTextRunner, False)):
        what = "results kept in state" if keep_in_state else "one text line per item"
        root = ws.fresh_dir(f"inshard-{runner_cls.__name__}")
        runner = runner_cls(user.EchoProvider(OmegaConf.create({"n_items": n})), output_dir=root, shard_subdir="engine")
        plan = make_plan(runner.job_spec(), range(n))
        write_manifest(plan)
        one_item = runner_cls(runner.provider, output_dir=root, shard_subdir="engine1")
        one_plan = make_plan(one_item.job_spec(), range(1))
        write_manifest(one_plan)
        base_env = build_worker_env(runner.provider)
        env = shard_env(plan.job, base_env)
        items = plan.shards[0]

        def shard_time(shard_runner: Any, shard_plan: Any) -> Callable[[], float]:
            def measure() -> float:
                with open(os.devnull, "w") as devnull:
                    stderr, sys.stderr = sys.stderr, devnull  # tqdm writes here, as to a shard's log file
                    try:
                        start = time.perf_counter()
                        run_shard(type(shard_runner), shard_plan, 0, base_env)
                        return time.perf_counter() - start
                    finally:
                        sys.stderr = stderr

            return measure

        def bare() -> float:
            shard_dir = root / "bare"
            shard_dir.mkdir(exist_ok=True)
            forward, start = runner_cls.forward, time.perf_counter()
            if keep_in_state:
                results = []
                for item in items:
                    results.append(forward(item, **env))
            else:
                writers, state, write_record = runner_cls.open_writers(shard_dir, **env), {}, runner_cls.write_record
                for item in items:
                    write_record(writers, forward(item, **env), state, **env)
                runner_cls.close_writers(writers, state, **env)
            return time.perf_counter() - start

        measures = {"engine": shard_time(runner, plan), "bare": bare, "engine, 1 item": shard_time(one_item, one_plan)}
        samples = interleaved(measures, ws.sizes.repeats)
        ours, ref, fixed = median(samples["engine"]), median(samples["bare"]), median(samples["engine, 1 item"])
        ratio = ref / ours  # throughput ratio
        bare_label = f"bare loop, forward -> {'list.append' if keep_in_state else 'write_record'} ({n / ref:,.0f} items/s)"
        rows.append(
            Row("in-shard throughput", f"run_shard, {what} ({n / ours:,.0f} items/s)", ours, bare_label, ref, ratio,
                ">= 0.9x", ratio >= 0.9, f"{n:,} items, trivial forward; ratio = throughput", samples)
        )  # fmt: skip
        rows.append(
            Row("in-shard throughput", f"same, less the per-shard cost of a 1-item shard ({fixed * 1e3:.1f} ms)", ours - fixed,
                bare_label, ref, ref / (ours - fixed), "(context)", None,
                "per-item cost only: a 1-item shard's run_shard (env check, writers, state pickle, done, fsyncs) subtracted")
        )  # fmt: skip
    return rows


def bench_workflow(ws: Workspace, espnet: Optional[Espnet3]) -> List[Row]:
    """snakemake --cores W (S shards) vs ESPnet3 BaseRunner on a Dask LocalCluster with W workers."""
    sizes, data = ws.sizes, ws.tone_data()
    outputs: Dict[str, Path] = {}

    def ours(n_shards: int, fork_server: bool = True) -> Callable[[], float]:
        name = f"ours{n_shards}" + ("" if fork_server else "-cold")

        def measure() -> float:
            ws.stop_fork_servers()
            workdir = ws.fresh_dir(f"workflow{n_shards}")
            wall = ws.run_decode(data, n_shards, workdir, env=None if fork_server else {"ESPNET3_RULES_FORKSERVER": "0"})
            outputs[name] = workdir / "results" / "decode" / "hyp.scp"
            return wall

        return measure

    def theirs() -> float:
        assert espnet is not None
        out = ws.fresh_dir("espnet3")
        cmd = [espnet.python, str(Path(__file__).resolve()), "_espnet3", "--data-dir", str(data),
               "--output-dir", str(out / "results"), "--workers", str(sizes.workers),
               "--batch-size", str(sizes.batch_size)]  # fmt: skip
        wall = run(cmd, espnet.env(BENCH), out, out / "espnet3.log")
        outputs["espnet3"] = out / "results" / "decode" / "hyp.scp"
        return wall

    shard_counts = [sizes.shards, *sizes.extra_shards]
    measures = {f"ours{n}": ours(n) for n in shard_counts}
    measures[f"ours{sizes.shards}-cold"] = ours(sizes.shards, fork_server=False)
    if espnet is not None:
        measures["espnet3"] = theirs
    samples = interleaved(measures, sizes.repeats)
    what = f"tone-ASR decode, {sizes.utts:,} utts, batch {sizes.batch_size}"
    ref_label = f"ESPnet3 BaseRunner, Dask LocalCluster({sizes.workers} workers)"
    ref_s = median(samples["espnet3"]) if espnet is not None else None
    rows = []
    labels = {f"ours{n}": f"snakemake --cores {sizes.workers}, {n} shards" for n in shard_counts}
    labels[f"ours{sizes.shards}-cold"] = f"same, {sizes.shards} shards, fork server off"
    for name, label in labels.items():
        ours_s = median(samples[name])
        note = what
        if espnet is not None:
            same = outputs[name].read_bytes() == outputs["espnet3"].read_bytes()
            note += f"; hyp.scp {'identical to' if same else 'DIFFERS from'} ESPnet3's"
        rows.append(
            Row("workflow wall time", label, ours_s,
                ref_label if espnet is not None else "ESPnet3 (skipped)", ref_s,
                None if ref_s is None else ours_s / ref_s, "<= 1.0x", None if ref_s is None else ours_s <= ref_s,
                note, {k: v for k, v in samples.items() if k in (name, "espnet3")})
        )  # fmt: skip
    return rows


def shard_of(item: int, n_items: int, n_shards: int, batch_size: int) -> int:
    """Shard id holding ``item`` under the plan's contiguous balanced split of batches."""
    n_batches = -(-n_items // batch_size)
    quotient, remainder = divmod(n_batches, n_shards)
    batch, start = item // batch_size, 0
    for shard_id in range(n_shards):
        start += quotient + (1 if shard_id < remainder else 0)
        if batch < start:
            return shard_id
    raise ValueError(item)


def bench_rerun(ws: Workspace, full_runs: Optional[List[float]]) -> List[Row]:
    """Snakemake rerun after one shard failed (its wav made unreadable, then restored) vs the full run."""
    sizes, data = ws.sizes, ws.tone_data()
    from espnet3_rules.examples.tone_asr.data import read_kaldi_map

    victim = sizes.utts // 2
    wav = Path(read_kaldi_map(data / "wav.scp")[victim][1])
    failed_shard = shard_of(victim, sizes.utts, sizes.shards, sizes.batch_size)
    reruns: Dict[str, List[float]] = {"cold": [], "warm": []}
    fails = []
    for _ in range(sizes.repeats):
        for start in reruns:
            ws.stop_fork_servers()
            workdir = ws.fresh_dir(f"rerun-{start}")
            hidden = wav.with_name(wav.name + ".hidden")
            os.replace(wav, hidden)  # the poison: one utterance's audio is missing
            try:
                fails.append(ws.run_decode(data, sizes.shards, workdir, "--keep-going", check=False))
            finally:
                os.replace(hidden, wav)
            done = [(workdir / f"results/decode/split.{i}/done").exists() for i in range(sizes.shards)]
            if done.count(False) != 1 or done[failed_shard]:
                raise RuntimeError(f"expected only shard {failed_shard} to fail, done flags: {done}")
            if start == "cold":
                ws.stop_fork_servers()  # as when the user reruns later; "warm" reruns at once
            reruns[start].append(ws.run_decode(data, sizes.shards, workdir, log="rerun.log"))
            if "localrule shard:" not in (workdir / "rerun.log").read_text() or not (workdir / "results/decode/merge.done").exists():
                raise RuntimeError(f"rerun in {workdir} did not rerun the failed shard and merge")
    if not full_runs:
        full_runs = []
        for _ in range(sizes.repeats):
            ws.stop_fork_servers()
            full_runs.append(ws.run_decode(data, sizes.shards, ws.fresh_dir("full")))
    full_s = median(full_runs)
    labels = {"cold": "snakemake rerun (1 of {n} shards + merge), later", "warm": "same, at once (fork server still up)"}
    rows = []
    for start, label in labels.items():
        rerun_s = median(reruns[start])
        rows.append(
            Row("rerun after 1 failed shard", label.format(n=sizes.shards), rerun_s, "full snakemake run", full_s,
                rerun_s / full_s, "<= 0.15x", rerun_s / full_s <= 0.15,
                f"the runs with the failure took {median(fails):.1f} s", {"rerun": reruns[start], "full": full_runs})
        )  # fmt: skip
    return rows


def echo_job(n_items: int, n_shards: int) -> Dict[str, Any]:
    """A trivial job (``EchoRunner``: ``str(dataset[idx])``) of the plan, local and scale parts."""
    return {
        "echo": {
            "runner": f"{RULES_USER}.EchoRunner",
            "provider": f"{RULES_USER}.EchoProvider",
            "provider_config": {"n_items": n_items},
            "items": n_items,
            "n_shards": n_shards,
            "output_dir": "results",
            "shard_subdir": "echo",
        }
    }


def against_bare(ws: Workspace, part: str, n_shards: int, job: Dict[str, Any], args: Sequence[str], label: str,
                 target: float, note: str) -> Row:
    """Our Snakefile vs :data:`BARE_SNAKEFILE` with ``args``, alternating, each in a fresh directory without
    fork servers; the row's ratio is of wall times (the note has the ratio of CPU times, which load disturbs less)."""
    samples: Dict[str, List[float]] = {"ours": [], "bare": [], "ours cpu": [], "bare cpu": []}

    def measure(name: str) -> Callable[[], float]:
        def once() -> float:
            ws.stop_fork_servers()
            workdir = ws.fresh_dir(f"{part.replace(' ', '-')}{n_shards}-{name}")
            if name == "ours":
                wall, cpu = ws.ours_snakemake(workdir, job, *args)
            else:
                wall, cpu = ws.bare_snakemake(workdir, n_shards, *args)
            samples[f"{name} cpu"].append(cpu)
            return wall

        return once

    samples.update(interleaved({"ours": measure("ours"), "bare": measure("bare")}, ws.sizes.repeats))
    ours, bare = median(samples["ours"]), median(samples["bare"])
    cpu_ratio = median(samples["ours cpu"]) / median(samples["bare cpu"])
    return Row(part, label, ours, f"bare Snakefile, same DAG, `touch` rules ({BARE_SNAKEFILE.name})", bare, ours / bare,
               f"<= {target}x", ours / bare <= target, f"{note}; CPU time ratio {cpu_ratio:.2f}x", samples)  # fmt: skip


def bench_plan(ws: Workspace) -> List[Row]:
    """``snakemake -n`` of a job of many shards vs the bare Snakefile's (the same DAG shape)."""
    items = ws.sizes.plan_items
    return [
        against_bare(ws, "dry-run planning", n, echo_job(items, n), ["-n"], f"snakemake -n, {n:,} shards", 1.3,
                     f"{items:,} items in {n:,} shards; the bare plan -> shards -> merge -> report of `touch` rules")
        for n in ws.sizes.plan_shards
    ]  # fmt: skip


def bench_local(ws: Workspace) -> List[Row]:
    """``snakemake --cores W`` of many one-item shards vs the bare Snakefile's ``touch`` jobs."""
    n, cores = ws.sizes.local_shards, str(ws.sizes.workers)
    return [
        against_bare(ws, "local run", n, echo_job(n, n), ["--cores", cores], f"snakemake --cores {cores}, {n} trivial shards",
                     2.0, f"{n} one-item shards (plan, shards, merge, report items), fork servers stopped before each run")
    ]  # fmt: skip


def bench_scale(ws: Workspace) -> List[Row]:
    """Plan, manifest.json, shards and merge of a trivial job in-process, at growing sizes: each should stay linear."""
    sys.path.insert(0, str(ws.user_dir))
    import rules_user as user
    from omegaconf import OmegaConf

    from espnet3_rules.engine.merge import merge_plan
    from espnet3_rules.engine.plan import make_plan, read_manifest, write_manifest
    from espnet3_rules.engine.shard import build_worker_env, run_shard

    rows, first = [], None
    for n_items, n_shards in ws.sizes.scale:
        provider = user.EchoProvider(OmegaConf.create({"n_items": n_items}))
        runner = user.EchoRunner(provider, output_dir=ws.fresh_dir(f"scale{n_shards}"), shard_subdir="echo", n_shards=n_shards)
        env, steps = build_worker_env(provider), {}

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            start = time.perf_counter()
            value = fn()
            steps[name] = time.perf_counter() - start
            return value

        plan = timed("plan", lambda: make_plan(runner.job_spec(), range(n_items)))
        manifest = timed("manifest.json write", lambda: write_manifest(plan))
        plan = timed("manifest.json read", lambda: read_manifest(manifest))
        with open(os.devnull, "w") as devnull:
            stderr, sys.stderr = sys.stderr, devnull  # tqdm's bars, as into the shards' logs
            try:
                timed("shards (run_shard, one after another)", lambda: [run_shard(user.EchoRunner, plan, i, env) for i in range(n_shards)])
            finally:
                sys.stderr = stderr
        timed("merge", lambda: merge_plan(runner, plan))
        size = manifest.stat().st_size
        for name, seconds in steps.items():
            base = None if first is None else first[name]
            growth = n_shards / ws.sizes.scale[0][1]
            rows.append(
                Row("scale", f"{name}, {n_items:,} items x {n_shards:,} shards", seconds,
                    "-" if base is None else f"same, {ws.sizes.scale[0][0]:,} x {ws.sizes.scale[0][1]:,}, times {growth:g}",
                    None if base is None else base * growth, None if base is None else seconds / (base * growth),
                    "linear (<= 1.5x)" if base is not None else "(base)", None if base is None else seconds <= 1.5 * base * growth,
                    f"manifest.json {size / 1e6:.2f} MB" if name.startswith("manifest") else "")
            )  # fmt: skip
        first = first or dict(steps)
    return rows


def write_shard_text(root: Path, n_shards: int, total_bytes: int) -> List[Path]:
    """``split.N/hyp.scp`` + ``field_keys.txt`` for ``n_shards`` shards, ~``total_bytes`` of scp lines."""
    words = "the quick brown fox jumps over the lazy dog and decodes another utterance"
    per_shard, block = total_bytes // n_shards, 20_000
    dirs = []
    for shard_id in range(n_shards):
        shard_dir = root / f"split.{shard_id}"
        shard_dir.mkdir(parents=True)
        (shard_dir / "field_keys.txt").write_text("hyp\n", encoding="utf-8")
        written, i = 0, 0
        with (shard_dir / "hyp.scp").open("w", encoding="utf-8") as f:
            while written < per_shard:
                chunk = "".join(f"utt{shard_id:03d}-{j:09d} {words}\n" for j in range(i, i + block))
                f.write(chunk)
                written, i = written + len(chunk), i + block
        dirs.append(shard_dir)
    return dirs


def bench_merge(ws: Workspace) -> List[Row]:
    """Merging ~merge_bytes of shard text vs ``cat`` of the same files."""
    from espnet3_rules import InferenceRunner
    from espnet3_rules.parallel.base_runner import concatenate_shard_files

    root = ws.fresh_dir("merge")
    shard_dirs = write_shard_text(root, ws.sizes.merge_shards, ws.sizes.merge_bytes)
    size = sum((d / "hyp.scp").stat().st_size for d in shard_dirs)
    fragments = [str(d / "hyp.scp") for d in shard_dirs]
    runner = InferenceRunner(provider=None, output_dir=root, shard_subdir="")
    out = root / "out.scp"

    def cat() -> float:
        out.unlink(missing_ok=True)
        with out.open("wb") as f:
            start = time.perf_counter()
            subprocess.run(["cat", *fragments], stdout=f, check=True)
            return time.perf_counter() - start

    def cat_fsync() -> float:
        start = time.perf_counter()
        cat()
        with out.open("rb+") as f:
            os.fsync(f.fileno())
        return time.perf_counter() - start

    # Each measurement starts without its output file, as cat's does: replacing a 1 GB file costs
    # freeing its blocks and, on ext4 (auto_da_alloc), starting writeback of the new one.
    def concatenate() -> float:
        out.unlink(missing_ok=True)
        start = time.perf_counter()
        concatenate_shard_files(shard_dirs, "hyp.scp", out)
        return time.perf_counter() - start

    def merge() -> float:
        (root / "hyp.scp").unlink(missing_ok=True)
        start = time.perf_counter()
        runner.merge(shard_dirs)
        return time.perf_counter() - start

    samples = interleaved({"cat": cat, "cat_fsync": cat_fsync, "concatenate": concatenate, "merge": merge}, ws.sizes.repeats)
    if not filecmp.cmp(root / "hyp.scp", out, shallow=False):
        raise RuntimeError(f"merged {root / 'hyp.scp'} differs from cat's {out}")
    cat_s = median(samples["cat"])
    rows = []
    for name, label in (("concatenate", "concatenate_shard_files"), ("merge", "InferenceRunner.merge (+ unique-id check)")):
        ours = median(samples[name])
        rows.append(
            Row("merge throughput", f"{label} ({size / ours / 1e6:,.0f} MB/s)", ours, f"cat ({size / cat_s / 1e6:,.0f} MB/s)",
                cat_s, cat_s / ours, ">= 0.5x", cat_s / ours >= 0.5,
                f"{size / 1e9:.2f} GB in {len(shard_dirs)} shards; ratio = throughput", {name: samples[name], "cat": samples["cat"]})
        )  # fmt: skip
    synced = median(samples["cat_fsync"])
    concat = median(samples["concatenate"])
    rows.append(
        Row("merge throughput", "concatenate_shard_files", concat, "cat, then fsync", synced,
            synced / concat, "(context)", None,
            "what an fsync of the merged data would cost (neither cat nor the merge fsyncs it)", samples)
    )  # fmt: skip
    for path in [root / "hyp.scp", out, *fragments]:
        Path(path).unlink(missing_ok=True)  # free the disk space at once
    return rows


#: ``kill_at.py K ARGS``: the CLI (``ARGS``) with the benchmark's EchoRunner SIGKILLed at item K.
RESUME_KILL_SCRIPT = """\
import os, signal, sys
import rules_user
from espnet3_rules.cli.main import main
kill_at, real = int(sys.argv[1]), rules_user.EchoRunner.forward
def forward(idx, *args, **kwargs):
    if idx == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(idx, *args, **kwargs)
rules_user.EchoRunner.forward = staticmethod(forward)
sys.exit(main(sys.argv[2:]))
"""


def bench_resume(ws: Workspace) -> List[Row]:
    """A shard (default records hooks) SIGKILLed at 90 % of its items, then rerun in this process."""
    sys.path.insert(0, str(ws.user_dir))
    import rules_user as user
    from omegaconf import OmegaConf

    from espnet3_rules.engine.journal import ITEMS_ENV
    from espnet3_rules.engine.plan import make_plan, write_manifest
    from espnet3_rules.engine.shard import build_worker_env, load_state, run_shard

    n = ws.sizes.resume_items
    every, kill_at = max(n // 100, 1), n * 9 // 10
    root = ws.fresh_dir("resume")
    runner = user.EchoRunner(user.EchoProvider(OmegaConf.create({"n_items": n})), output_dir=root, shard_subdir="resume")
    plan = make_plan(runner.job_spec(), range(n))
    manifest = write_manifest(plan)
    script = root / "kill_at.py"
    script.write_text(RESUME_KILL_SCRIPT, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=pythonpath(ws.user_dir), **{ITEMS_ENV: str(every)})
    cmd = [sys.executable, str(script), str(kill_at), "run-shard", "--manifest", str(manifest), "--shard", "0"]
    killed = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if killed.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the shard was not killed at item {kill_at} ({killed.returncode}):\n{killed.stderr[-2000:]}")
    calls: List[int] = []
    real = user.EchoRunner.forward
    user.EchoRunner.forward = staticmethod(lambda idx, *a, **kw: calls.append(idx) or real(idx, *a, **kw))
    try:
        start = time.perf_counter()
        run_shard(user.EchoRunner, plan, 0, build_worker_env(runner.provider))
        wall = time.perf_counter() - start
    finally:
        user.EchoRunner.forward = real
    if load_state(plan.shard_dir(0))["records"] != [str(i) for i in range(n)]:
        raise RuntimeError("the resumed shard's records differ from an uninterrupted run's")
    share = len(calls) / n
    return [
        Row("resume after a kill", f"rerun of a shard SIGKILLed at 90 % of {n:,} items ({len(calls):,} computed)", wall,
            "ESPnet3, Kaldi, Snakemake: the whole shard again", None, share, "<= 0.15", share <= 0.15,
            f"ratio = items the rerun computes / items in the shard; a commit every {every} items ({ITEMS_ENV}; "
            f"by default every 5 s); {kill_at - calls[0] if calls else 0} items computed in both runs")
    ]  # fmt: skip


# ------------------------------------------------------------------------------ report
def fmt_s(value: Optional[float]) -> str:
    """Seconds with 3 significant digits ('-' for none)."""
    return "-" if value is None else f"{value:.3g} s"


def table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| part | ours | median | reference | median | ratio | target | met |",
        "| --- | --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.part} | {r.ours} | {fmt_s(r.ours_s)} | {r.ref} | {fmt_s(r.ref_s)} | {ratio} | {r.target} | {met} |")
    notes = [f"- {r.part} / {r.ours}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + [""] + notes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the selected parts and print machine info and the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_espnet3"]:
        return espnet3_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each (smoke test)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--repeats", type=int, help="runs per measurement (default 3; 1 with --quick)")
    parser.add_argument("--no-espnet", action="store_true", help="skip ESPnet3 (no download, no venv)")
    parser.add_argument("--espnet-version", default="202611", help="espnet wheel holding espnet3/parallel")
    parser.add_argument("--cache-dir", type=Path, default=BENCH / ".cache", help="wheel, test data (git-ignored)")
    parser.add_argument("--venv", type=Path, default=BENCH / ".venv", help="venv with dask for ESPnet3 (git-ignored)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", type=Path, help="also write the rows and machine info as JSON here")
    args = parser.parse_args(argv)

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    sizes = QUICK if args.quick else Sizes()
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats)

    espnet = None
    if "workflow" in parts and not args.no_espnet:
        try:
            espnet = setup_espnet3(args.cache_dir, args.espnet_version, args.venv)
        except (OSError, RuntimeError, subprocess.CalledProcessError, StopIteration) as exc:
            print(f"ESPnet3 comparison skipped: {exc}", file=sys.stderr)

    info = machine_info(espnet)
    scratch = Path(tempfile.mkdtemp(prefix="espnet3-rules-bench-"))
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    ws = Workspace(scratch, args.cache_dir, sizes)
    rows: List[Row] = []
    try:
        if "inshard" in parts:
            rows += bench_inshard(ws)
        if "workflow" in parts:
            rows += bench_workflow(ws, espnet)
        if "rerun" in parts:
            full = next((r.samples[f"ours{sizes.shards}"] for r in rows if f"ours{sizes.shards}" in r.samples), None)
            rows += bench_rerun(ws, full)
        if "plan" in parts:
            rows += bench_plan(ws)
        if "local" in parts:
            rows += bench_local(ws)
        if "scale" in parts:
            rows += bench_scale(ws)
        if "merge" in parts:
            rows += bench_merge(ws)
        if "resume" in parts:
            rows += bench_resume(ws)
    finally:
        ws.stop_fork_servers()
        if args.keep:
            print(f"scratch kept in {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    info["load average (1/5/15 min) at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["runs per measurement"] = sizes.repeats

    print("\n".join(f"- {k}: {v}" for k, v in info.items()))
    print()
    print(table(rows))
    if args.json:
        payload = {"machine": info, "rows": [r.__dict__ for r in rows]}
        args.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
