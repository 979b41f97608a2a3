"""CLI: ``plan``/``run-shard``/``merge``/``status`` exit codes and one-line errors."""

from __future__ import annotations

import json
import re

import pytest

import core_fixtures as fx
from espnet3_rules.cli.config import Unit

JOB = dict(runner="core_fixtures.MyTextRunner", provider="core_fixtures.WordsProvider", provider_config={"n": 9},
           n_shards=3)


def job_config(tmp_path, **changes):
    job = dict(JOB, output_dir=str(tmp_path / "out"))
    job.update(changes)
    return fx.write_config(tmp_path / "config.yaml", **{k: v for k, v in job.items() if v is not None})


def one_line_error(proc, command, message):
    """Exit 2, nothing but ``espnet3_rules <command>: error: <message...>`` on stderr."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"espnet3_rules {command}: error: "), lines[0]
    assert message in lines[0], lines[0]


def test_plan_run_shard_merge_status(tmp_path):
    config = job_config(tmp_path)
    manifest = tmp_path / "out" / "manifest.json"
    job = ("--config", config, "--job", "j")

    plan = fx.cli("plan", *job)
    assert plan.stdout.strip() == f"{manifest}: 3 shards x 3 items (9 items, batch_size=None)"
    assert json.loads(manifest.read_text())["n_shards"] == 3

    status = fx.cli("status", "--manifest", manifest, check=False)
    assert status.returncode == 3 and status.stdout.strip().endswith("0 done, pending: [0, 1, 2]")
    one_line_error(fx.cli("merge", *job, check=False), "merge",
                   f"cannot merge {tmp_path / 'out'}: shards not done: split.0, split.1, split.2; "
                   "run those shards first")

    ran = fx.cli("run-shard", "--manifest", manifest, "--shard", 2)
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'out' / 'split.2'))}: done \(3 items; [\d.]+ s CPU, \d+ MB peak RSS\)",
                        ran.stdout.strip())
    status = fx.cli("status", *job, check=False)
    assert status.returncode == 3 and status.stdout.strip().endswith("1 done, pending: [0, 1]")
    for shard in (0, 1):
        fx.cli("run-shard", *job, "--shard", shard)
    assert fx.cli("status", *job).stdout.strip().endswith("3 done, pending: none")

    assert fx.cli("merge", "--manifest", manifest).stdout.strip() == f"{tmp_path / 'out'}: merged 3 shards"
    assert (tmp_path / "out" / "text").read_text() == fx.expected_text(range(9))
    assert json.loads((tmp_path / "out" / "merge.done").read_text())["result"] == {}


def test_plan_from_unit_json(tmp_path):
    unit = Unit(job="j", output_dir=str(tmp_path / "out"), **JOB)
    fx.cli("plan", "--unit-json", unit.to_json())
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["spec"]["runner"] == JOB["runner"]


PLAN_ERRORS = {
    "unknown job": (dict(), ("--job", "nope"), "no job 'nope' in config; jobs are ['j']"),
    "forward capturing self": (dict(runner="core_fixtures.SelfRunner"), (),
                               "SelfRunner.forward must be a @staticmethod"),
    "setup fn returning the env": (dict(provider="core_fixtures.DictSetupProvider"), (),
                                   "DictSetupProvider.build_worker_setup_fn() returned a dict"),
    "provider without worker setup": (dict(provider="core_fixtures.LocalOnlyProvider"), (),
                                      "LocalOnlyProvider must implement build_worker_setup_fn()"),
    "runner module missing": (dict(runner="no_such_module_xyz.R"), (),
                              "no module 'no_such_module_xyz' can be imported"),
    "runner attribute missing": (dict(runner="core_fixtures.Nope"), (),
                                 "module 'core_fixtures' has no attribute 'Nope'"),
    "batch_size zero": (dict(batch_size=0), (), "jobs.j: batch_size must be a positive integer or null, got 0"),
    "n_shards zero": (dict(n_shards=0), (), "jobs.j: n_shards must be an integer >= 1, got 0"),
    "empty dataset": (dict(provider_config={"n": 0}), (), "jobs.j: the dataset is empty"),
    "more shards than items": (dict(n_shards=10), (), "jobs.j: n_shards (10) exceeds the number of items (9)"),
    "output_dir missing": (dict(output_dir=None), (), "jobs.j: missing required key(s) ['output_dir']"),
    "unknown job key": (dict(n_shard=2), (), "jobs.j: unknown key(s) ['n_shard']; known keys are ['runner', "),
    "env without dataset": (dict(provider="core_fixtures.RenamedProvider"), (),
                            "jobs.j: RenamedProvider's env has no 'dataset' (it has ['ds', 'net'])"),
}


@pytest.mark.parametrize("changes, extra, message", PLAN_ERRORS.values(), ids=PLAN_ERRORS.keys())
def test_plan_errors_are_one_line(tmp_path, changes, extra, message):
    config = job_config(tmp_path, **changes)
    args = ["plan", "--config", config, "--job", "j", *extra]
    one_line_error(fx.cli(*args, check=False), "plan", message)
    assert not (tmp_path / "out").exists()


def test_config_file_errors_are_one_line(tmp_path):
    one_line_error(fx.cli("plan", "--config", tmp_path / "none.yaml", "--job", "j", check=False), "plan",
                   f"{tmp_path / 'none.yaml'}: cannot read config")
    (tmp_path / "bad.yaml").write_text("jobs: [unclosed\n")
    bad_yaml = fx.cli("plan", "--config", tmp_path / "bad.yaml", "--job", "j", check=False)
    one_line_error(bad_yaml, "plan", f"{tmp_path / 'bad.yaml'}")
    assert "expected ',' or ']', but got '<stream end>'" in bad_yaml.stderr
    one_line_error(fx.cli("plan", check=False), "plan",
                   "name the job with --unit-json, or with --config FILE --job NAME")
    (tmp_path / "list.yaml").write_text("jobs: [a, b]\n")
    one_line_error(fx.cli("plan", "--config", tmp_path / "list.yaml", "--job", "j", check=False), "plan",
                   "config 'jobs' must be a mapping of job name -> settings, got list")


def test_quoted_multi_line_errors_print_as_one_line(tmp_path):
    (tmp_path / "loud_runners.py").write_text("raise ValueError('first line\\n  second line')\n")
    config = job_config(tmp_path, runner="loud_runners.Runner")
    loud = fx.cli("plan", "--config", config, "--job", "j", path=[tmp_path], check=False)
    one_line_error(loud, "plan", "importing 'loud_runners' raised ValueError: first line")
    assert "second line" in loud.stderr


def test_manifest_errors_are_one_line(tmp_path):
    missing = tmp_path / "out" / "manifest.json"
    for command in ("status", "merge"):
        one_line_error(fx.cli(command, "--manifest", missing, check=False), command,
                       f"{missing}: manifest not found; run the plan step first")
    one_line_error(fx.cli("run-shard", "--manifest", missing, "--shard", 0, check=False), "run-shard",
                   "manifest not found")
    missing.parent.mkdir()
    missing.write_text('{"version": 1, ')
    one_line_error(fx.cli("status", "--manifest", missing, check=False), "status", "manifest is not valid JSON")
    missing.write_text('{"version": 99}')
    one_line_error(fx.cli("status", "--manifest", missing, check=False), "status", "manifest version 99 is not 1")


def test_run_shard_errors_are_one_line(tmp_path):
    config = job_config(tmp_path)
    fx.cli("plan", "--config", config, "--job", "j")
    manifest = tmp_path / "out" / "manifest.json"
    one_line_error(fx.cli("run-shard", "--manifest", manifest, "--shard", 3, check=False), "run-shard",
                   "shard 3 does not exist; the plan has shards 0..2")
    assert not (tmp_path / "out" / "split.3").exists()

    job_config(tmp_path, runner="core_fixtures.MyTextRunner", provider="core_fixtures.RenamedProvider", items=2,
               n_shards=1)
    fx.cli("plan", "--config", config, "--job", "j")
    mismatch = fx.cli("run-shard", "--manifest", manifest, "--shard", 0, check=False)
    one_line_error(mismatch, "run-shard",
                   "MyTextRunner.forward needs 'dataset', 'model' but RenamedProvider's env provides [")
    assert "'ds', 'net'" in mismatch.stderr
    assert not (tmp_path / "out" / "split.0").exists()
