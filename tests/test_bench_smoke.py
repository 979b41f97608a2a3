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
    for part in ("in-shard throughput", "workflow wall time", "rerun after 1 failed shard", "dry-run planning", "merge throughput"):
        assert f"| {part} |" in out, f"no {part!r} row in:\n{out}"
    assert "ESPnet3 (skipped)" in out
    assert "- snakemake: " in out and "- python: " in out
    assert (tmp_path / "bench.json").exists()
    assert not (tmp_path / "cache" / "wheels").exists(), "--no-espnet must not download anything"
