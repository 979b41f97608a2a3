"""Shared fixtures, and the one table that sorts tests into tiers (markers).

The markers (registered in pyproject.toml, ``--strict-markers``):

- ``e2e``: runs Snakemake, or a whole workflow as subprocesses;
- ``slurm``: needs SLURM (a running cluster, or slurm-wlm to start a private one);
- ``espnet3``: downloads or uses the real ESPnet3 (espnet) wheel.

The fast unit tier is ``python -m pytest -q -m "not e2e and not slurm and not espnet3"``;
plain ``python -m pytest -q`` runs everything. A test module is classified here, in ``TIERS``,
not in the module: a key is a module name (every test in it) or ``module::pattern``, a
``fnmatch`` pattern over the test function's name (for a module that mixes fast and slow tests).
A module not named here is in the fast tier.
"""

import fnmatch
import re
from pathlib import Path

import pytest

import yaml

from workflow_driver import REPO, SnakemakeServer, Workflow

TIERS = {
    # Snakemake runs: every test in the module.
    "test_workflow": {"e2e"},
    "test_bench_smoke": {"e2e"},  # bench/run_bench.py --quick: whole workflows as subprocesses
    "test_slurm": {"e2e", "slurm"},  # Snakemake through the SLURM profile on the running cluster
    "test_slurm_cluster_script": {"slurm"},  # scripts/slurm-cluster.sh: private SLURM daemons
    "test_espnet3_reference": {"espnet3"},  # differential tests against the unpacked espnet wheel
    "test_espnet3_contract": {"espnet3"},  # espnet3_rules.contract against the wheel's espnet3.contract
    "test_espnet3_conformance": {"espnet3"},  # the same user programs under ESPnet3 and import-switched
    "test_espnet3_measure": {"espnet3"},  # measure() and the metric classes against the wheel's
    # Mixed modules: the tests that run Snakemake (the rest are in-process or one shard process).
    "test_bad_inputs::test_bad_config_fails_the_dry_run": {"e2e"},
    "test_bad_inputs::test_runtime_mistake_ends_its_log_with_one_line": {"e2e"},
    "test_bad_inputs::test_paths_with_spaces_and_unicode_ids_work": {"e2e"},
    "test_faults::test_end_to_end_kills_then_a_plain_rerun_is_byte_identical": {"e2e"},
    "test_faults::test_torn_done_under_snakemake_fails_the_merge_then_a_plain_rerun_heals": {"e2e"},
    "test_faults::test_second_snakemake_on_the_same_directory_is_refused": {"e2e"},
    "test_faults::test_killed_snakemake_keeps_finished_shards": {"e2e"},
    "test_status::test_status_after_snakemake_*": {"e2e"},
    "test_espnet3_reference::test_words_runner_under_snakemake_matches_espnet3_in_process": {"e2e"},
    "test_espnet3_reference::test_espnet3_inference_runner_under_snakemake_matches_espnet3": {"e2e"},
    "test_espnet3_reference::test_switched_inference_provider_with_our_inference_runner_matches_espnet3": {"e2e"},
    "test_espnet3_reference::test_runner_option_reaches_merge_and_change_reruns_only_that_job": {"e2e"},
    "test_inference_providers::test_systems_provider_named_directly_plans_and_runs_under_snakemake": {"e2e"},
    "test_import_espnet3::test_converted_recipe_runs_under_snakemake_as_infer_runs_it": {"e2e"},
    "test_espnet3_stages": {"espnet3", "e2e"},  # 202611's infer() and ours (shards through Snakemake)
    "test_parallel_exec::test_two_workers_*": {"e2e"},  # runner(indices) through snakemake.api
    "test_parallel_exec::test_a_failed_shard_*": {"e2e"},
    "test_parallel_exec::test_ctrl_c_*": {"e2e"},
    "test_parallel_exec::test_slurm_env_*": {"e2e", "slurm"},
    "test_report::test_report_of_the_default_job_*": {"e2e"},  # the default job, then the report in Chromium
}

# Fixtures that run Snakemake: a test using one and not marked e2e is reported (see below).
SNAKEMAKE_FIXTURES = {"wf", "snakemake_server", "default_job"}

TESTS = Path(__file__).resolve().parent


def _markers_for(module: str, function: str) -> set:
    markers = set(TIERS.get(module, ()))
    for key, names in TIERS.items():
        mod, sep, pattern = key.partition("::")
        if sep and mod == module and fnmatch.fnmatchcase(function, pattern):
            markers |= names
    return markers


def pytest_configure(config):
    # A stale entry would silently move slow tests into the fast tier: name it.
    missing = sorted({key.partition("::")[0] for key in TIERS} - {path.stem for path in TESTS.glob("test_*.py")})
    if missing:
        config.issue_config_time_warning(
            pytest.PytestConfigWarning(f"conftest TIERS names modules not in tests/: {', '.join(missing)}"), stacklevel=2)
    for key in TIERS:
        mod, sep, pattern = key.partition("::")
        path = TESTS / f"{mod}.py"
        if sep and path.exists():
            defined = re.findall(r"^(?:async\s+)?def\s+(test\w*)", path.read_text(encoding="utf-8"), re.M)
            if not fnmatch.filter(defined, pattern):
                config.issue_config_time_warning(
                    pytest.PytestConfigWarning(f"conftest TIERS: {key!r}: no such test in {path.name}"),
                    stacklevel=2)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    unmarked = []
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if getattr(item, "module", None) else item.path.stem
        function = getattr(item, "originalname", None) or item.name
        markers = _markers_for(module, function)
        for name in sorted(markers):
            item.add_marker(name)
        if "e2e" not in markers and SNAKEMAKE_FIXTURES & set(getattr(item, "fixturenames", ())):
            unmarked.append(item.nodeid)
    if unmarked:
        config.issue_config_time_warning(pytest.PytestConfigWarning(
            "uses a Snakemake fixture but is not marked e2e in conftest TIERS: " + ", ".join(unmarked)), stacklevel=2)


@pytest.fixture
def wf(tmp_path):
    """A Snakemake working directory in ``tmp_path`` (see :class:`workflow_driver.Workflow`)."""
    return Workflow(tmp_path)


@pytest.fixture(scope="session")
def default_job(tmp_path_factory):
    """A working directory where the shipped config/config.yaml ran (``snakemake --cores 2``), once per session."""
    wf = Workflow(tmp_path_factory.mktemp("default_job"))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    (wf.path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    wf.snakemake("--cores", "2")
    return wf


@pytest.fixture(scope="session")
def snakemake_server(tmp_path_factory):
    """One process that forks a Snakemake run per request (for the many short dry-runs)."""
    server = SnakemakeServer(tmp_path_factory.mktemp("snakemake_server"))
    yield server
    server.close()
