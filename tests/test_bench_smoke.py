"""Smoke run of bench/run_bench.py --quick without ESPnet3 (no network): it runs and prints its table.

Timings are not checked: the machine running the tests is shared and noisy.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_bench_runs_every_part_and_prints_the_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(REPO / "bench" / "run_bench.py"), "--quick", "--no-espnet",
           "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "bench.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "| part | ours | median | reference | median | ratio | target | met |" in out
    for part in ("in-shard throughput", "workflow wall time", "rerun after 1 failed shard", "dry-run planning", "local run",
                 "scale", "merge throughput"):
        assert f"| {part} |" in out, f"no {part!r} row in:\n{out}"
    assert "ESPnet3 (skipped)" in out
    assert "bare Snakefile, same DAG" in out, "the dry-run and local rows compare with bench/bare.smk"
    assert "- snakemake: " in out and "- python: " in out
    assert (tmp_path / "bench.json").exists()
    assert not (tmp_path / "cache" / "wheels").exists(), "--no-espnet must not download anything"


def test_bench_venv_run_from_a_virtualenv_sees_its_packages(tmp_path):
    """Run from a virtualenv (the project installed there, not in the base interpreter), the bench venv
    for ESPnet3 imports that virtualenv's packages (omegaconf and the rest), not only the base's."""
    outer = tmp_path / "outer"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(outer)], check=True)
    outer_python = str(outer / "bin" / "python")
    where = [outer_python, "-c", "import site; print(site.getsitepackages()[0])"]
    outer_site = Path(subprocess.run(where, capture_output=True, text=True, check=True).stdout.strip())
    (outer_site / "only_in_the_outer_venv.py").write_text("WHERE = 'outer'\n", encoding="utf-8")
    make = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import run_bench; "
            "print(run_bench.make_bench_venv(Path(sys.argv[2])))")  # fmt: skip
    made = subprocess.run([outer_python, "-c", make, str(REPO / "bench"), str(tmp_path / "bench-venv")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))  # fmt: skip
    assert made.returncode == 0, made.stderr
    bench_python = made.stdout.strip().splitlines()[-1]
    probe = subprocess.run([bench_python, "-c", "import only_in_the_outer_venv as m; print(m.WHERE)"],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))  # fmt: skip
    assert probe.stdout.strip() == "outer", probe.stderr
