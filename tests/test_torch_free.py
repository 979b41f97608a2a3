"""The core package imports and runs jobs in a Python where ``import torch`` (and numpy, jiwer) fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import toys as fx

BLOCKER = '''\
import sys


BLOCKED = ("torch", "numpy", "jiwer")


class BlockHeavy:
    """Meta-path finder that makes every torch (and numpy, jiwer) import fail."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, BlockHeavy())
'''

JOB = '''\
import importlib, json, pkgutil, sys

blocked = []
for heavy in ("torch", "numpy", "jiwer"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        blocked.append(heavy)

import espnet3_rules
from espnet3_rules import InferenceRunner
from espnet3_rules.cli.main import main
import toys as fx

modules = sorted(
    m.name for m in pkgutil.walk_packages(espnet3_rules.__path__, "espnet3_rules.")
    if not m.name.startswith("espnet3_rules.examples") and not m.name.endswith("__main__")
)
for name in modules:
    importlib.import_module(name)

out = sys.argv[1]
text = fx.MyTextRunner(fx.SampleProvider({"n": 4}), output_dir=out, shard_subdir="text", n_shards=2)(range(4))
scp = InferenceRunner(fx.CountingInferenceProvider({"n": 3}), output_dir=out, shard_subdir="scp", n_shards=2,
                      input_key="word", output_fn="toys.to_record")(range(3))
status = main(["status", "--manifest", f"{out}/scp/manifest.json"])
print(json.dumps({"blocked": blocked, "modules": modules, "text": text, "scp": scp, "status": status,
                  "heavy_loaded": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy", "jiwer"})}))
'''


def test_core_package_works_where_torch_cannot_be_imported(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(fx.REPO), str(fx.TESTS)]))
    proc = subprocess.run([sys.executable, "-c", JOB, str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["blocked"] == ["torch", "numpy", "jiwer"], "the blocker must make these imports fail"
    assert report["heavy_loaded"] == []
    assert {"espnet3_rules.cli.main", "espnet3_rules.engine.shard", "espnet3_rules.systems.base.inference_runner"} <= set(report["modules"])
    assert report["text"] == {} and report["status"] == 0
    assert (tmp_path / "out" / "text" / "text").read_text() == fx.expected_text(range(4))
    assert report["scp"] is True
    assert sorted(p.name for p in (tmp_path / "out" / "scp").glob("*.scp")) == ["length.scp", "text.scp"]
