"""The house: ESPnet3's surface at ESPnet3's module paths, an engine that never imports it back."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "espnet3_rules"

#: ESPnet3 202611 module -> public names a user imports from it.
ESPNET3_SURFACE = {
    "parallel.base_runner": ["BaseRunner", "concatenate_shard_files"],
    "parallel.env_provider": ["EnvironmentProvider"],
    "parallel.inference_provider": ["InferenceProvider"],
    "systems.base.inference_runner": ["InferenceRunner"],
    "systems.base.inference_provider": ["InferenceProvider"],
}


#: Names that are a class of their own at that path (as in ESPnet3), not the top-level one of that name.
OWN_CLASSES = {("systems.base.inference_provider", "InferenceProvider")}


@pytest.mark.parametrize("module, names", sorted(ESPNET3_SURFACE.items()))
def test_espnet3_module_paths_hold_the_public_names(module, names):
    ours = importlib.import_module(f"espnet3_rules.{module}")
    for name in names:
        if (module, name) in OWN_CLASSES:
            assert getattr(ours, name).__module__ == ours.__name__
        else:
            assert getattr(ours, name) is getattr(importlib.import_module("espnet3_rules"), name)


#: ESPnet3 202611's metric modules -> the names a recipe or a metric subclass imports (classes of their own here).
METRIC_SURFACE = {
    "components.metrics.base_metric": ["BaseMetric"],
    "contract.metrics": ["DATASET_PREFIX", "MetricContractError", "check_metric_contract", "check_metric_inputs"],
    "systems.base.metric": ["measure", "DATASET_PREFIX"],
    "systems.esp2_asr.metrics.wer": ["WER"],
    "systems.esp2_asr.metrics.cer": ["CER"],
    "utils.scp_utils": ["get_class_path", "load_scp_paths"],
}


@pytest.mark.parametrize("module, names", sorted(METRIC_SURFACE.items()))
def test_espnet3_metric_paths_hold_the_public_names(module, names):
    ours = importlib.import_module(f"espnet3_rules.{module}")
    assert [name for name in names if not hasattr(ours, name)] == []


def imported_modules(path: Path) -> set:
    """Absolute names of the modules a source file imports (relative imports resolved against the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "engine").glob("*.py")), ids=lambda p: p.name)
def test_the_engine_imports_nothing_of_the_user_surface_or_the_glue(path):
    ours = {name for name in imported_modules(path) if name.startswith("espnet3_rules")}
    assert all(name.startswith("espnet3_rules.engine") for name in ours), ours


def test_planning_imports_no_metrics_and_no_torch():
    code = (
        "import sys, espnet3_rules.cli.config, espnet3_rules.cli.main, espnet3_rules.engine.plan;"
        "scoring = ('espnet3_rules.systems.base.metric', 'espnet3_rules.components.metrics');"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(scoring)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
