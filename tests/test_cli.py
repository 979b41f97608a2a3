"""CLI: ``plan``/``run-shard``/``merge``/``status`` exit codes and one-line errors; jobs from the config.

End-to-end flows run ``python -m espnet3_rules`` as the Snakemake rules do; error lines are checked
in-process through ``toys.run_main`` (the same ``main``, no interpreter start per case).
Where a message belongs to the engine, the CLI line is compared with what the engine raises
(the message itself is asserted where that check lives).
"""

from __future__ import annotations

import json
import re

import pytest

import toys as fx
from espnet3_rules import ContractError
from espnet3_rules.cli.config import (
    DEFAULT_RESOURCES,
    job_from_config,
    jobs_from_config,
    read_config,
    shard_resource,
)
from espnet3_rules.engine.job import JobSpec
from espnet3_rules.engine.merge import completed_shard_dirs
from espnet3_rules.engine.plan import plan_job, read_manifest
from espnet3_rules.engine.shard import run_shard

JOB = dict(runner="toys.MyTextRunner", provider="toys.SampleProvider", provider_config={"n": 9},
           n_shards=3)


def job_config(tmp_path, **changes):
    job = dict(JOB, output_dir=str(tmp_path / "out"))
    job.update(changes)
    return fx.write_config(tmp_path / "config.yaml", **{k: v for k, v in job.items() if v is not None})


def engine_error(call):
    """The message of the ContractError ``call()`` raises."""
    with pytest.raises(ContractError) as info:
        call()
    return str(info.value)


def one_line_error(proc, command, message, exact=False):
    """Exit 2, nothing but ``espnet3_rules <command>: error: <message...>`` on stderr."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    prefix = f"espnet3_rules {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    if exact:
        assert lines[0] == prefix + message
    else:
        assert message in lines[0], lines[0]


def test_plan_run_shard_merge_status(tmp_path):
    config = job_config(tmp_path)
    manifest = tmp_path / "out" / "manifest.json"
    job = ("--config", config, "--job", "j")

    plan = fx.cli("plan", *job)
    assert plan.stdout.strip() == f"{manifest}: 3 shards x 3 items (9 items, batch_size=None)"
    assert json.loads(manifest.read_text())["n_shards"] == 3

    status = fx.cli("status", "--manifest", manifest, check=False)
    assert status.returncode == 3 and status.stdout.splitlines() == [
        f"{tmp_path / 'out'} (j): 3 shards x 3 items (9 items, batch_size=None); 0 done, 0 running, 0 failed, 3 pending",
        "  pending: split.0 split.1 split.2",
    ]
    one_line_error(fx.cli("merge", *job, check=False), "merge",
                   engine_error(lambda: completed_shard_dirs(read_manifest(manifest))), exact=True)

    ran = fx.cli("run-shard", "--manifest", manifest, "--shard", 2)
    shard_line = rf"{re.escape(str(tmp_path / 'out' / 'split.2'))}: done \(3 items; [\d.]+ s CPU, \d+ MB peak RSS\)"
    assert re.fullmatch(shard_line, ran.stdout.strip())
    status = fx.cli("status", *job, check=False)
    assert status.returncode == 3 and status.stdout.splitlines()[1:] == ["  pending: split.0 split.1"]
    for shard in (0, 1):
        fx.cli("run-shard", *job, "--shard", shard)
    assert fx.cli("status", *job).stdout.strip().endswith("3 done, 0 running, 0 failed, 0 pending")

    assert fx.cli("merge", "--manifest", manifest).stdout.strip() == f"{tmp_path / 'out'}: merged 3 shards"
    assert (tmp_path / "out" / "text").read_text() == fx.expected_text(range(9))
    assert json.loads((tmp_path / "out" / "merge.done").read_text())["result"] == {}


def test_job_json_plan_shards_and_merge_rebuild_the_runner_with_its_options(tmp_path):
    """What the Snakemake rules do: ``plan --job-json``, one ``run-shard`` per shard, ``merge``; each
    process rebuilds the runner from the manifest's job description, ``beam`` included."""
    calls = tmp_path / "calls"
    job = JobSpec(name="beam", runner="toys.BeamRunner", provider="toys.SampleProvider",
                  provider_config={"n": 5, "extra_env": {"calls_file": str(calls)}},
                  runner_kwargs={"beam": 5}, output_dir=str(tmp_path / "out"), shard_subdir="dev", n_shards=2)
    fx.cli("plan", "--job-json", job.to_json())
    manifest = tmp_path / "out" / "dev" / "manifest.json"
    assert read_manifest(manifest).job == job
    for shard in range(2):
        fx.cli("run-shard", "--manifest", manifest, "--shard", shard)
    assert fx.read_lines(calls) == [f"{i} beam=5" for i in range(5)], "every shard's forward saw beam=5"
    fx.cli("merge", "--manifest", manifest)
    merged = (tmp_path / "out" / "dev" / "merged").read_text().splitlines()
    assert merged == [f"{i} beam=5 {f'W{i}' * 5}" for i in range(5)] + ["merge beam=5"]
    assert json.loads((tmp_path / "out" / "dev" / "merge.done").read_text())["result"]["merge_beam"] == 5


CONFIG_ERRORS = {
    "unknown job": (dict(), ("--job", "nope"), "job 'nope' is not in the config; jobs are ['j']"),
    "batch_size zero": (dict(batch_size=0), (), "config.yaml: jobs.j.batch_size: 0 is less than the minimum of 1"),
    "n_shards zero": (dict(n_shards=0), (), "config.yaml: jobs.j.n_shards: 0 is less than the minimum of 1"),
    "output_dir missing": (dict(output_dir=None), (), "config.yaml: jobs.j: 'output_dir' is a required property"),
    "unknown job key": (dict(n_shard=2), (),
                        "config.yaml: jobs.j: Additional properties are not allowed ('n_shard' was unexpected)"),
    "runner not an import path": (dict(runner="MyTextRunner"), (),
                                  "config.yaml: jobs.j.runner: 'MyTextRunner' does not match"),
}


@pytest.mark.parametrize("changes, extra, message", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_config_errors_are_one_line_schema_messages(tmp_path, changes, extra, message):
    config = job_config(tmp_path, **changes)
    one_line_error(fx.run_main("plan", "--config", config, "--job", "j", *extra, check=False), "plan", message)
    assert not (tmp_path / "out").exists()


CONTRACT_ERRORS = {
    "forward capturing self": dict(runner="toys.SelfRunner"),
    "setup fn returning the env": dict(provider="toys.DictSetupProvider"),
    "more shards than items": dict(n_shards=10),
    "env without dataset": dict(provider="toys.RenamedProvider"),
}


@pytest.mark.parametrize("changes", CONTRACT_ERRORS.values(), ids=CONTRACT_ERRORS.keys())
def test_plan_prints_the_contract_error_of_plan_job_as_one_line(tmp_path, changes):
    config = job_config(tmp_path, **changes)
    message = engine_error(lambda: plan_job(job_from_config(read_config(config), "j")))
    one_line_error(fx.run_main("plan", "--config", config, "--job", "j", check=False), "plan", message, exact=True)
    assert not (tmp_path / "out").exists()


def test_config_file_errors_are_one_line(tmp_path):
    one_line_error(fx.run_main("plan", "--config", tmp_path / "none.yaml", "--job", "j", check=False), "plan",
                   f"{tmp_path / 'none.yaml'}: cannot read config")
    (tmp_path / "bad.yaml").write_text("jobs: [unclosed\n")
    one_line_error(fx.run_main("plan", "--config", tmp_path / "bad.yaml", "--job", "j", check=False), "plan",
                   f"{tmp_path / 'bad.yaml'}:2:1: not valid YAML (expected ',' or ']', but got '<stream end>')",
                   exact=True)
    one_line_error(fx.run_main("plan", check=False), "plan",
                   "name the job with --job-json, or with --config FILE --job NAME")
    (tmp_path / "list.yaml").write_text("jobs: [a, b]\n")
    one_line_error(fx.run_main("plan", "--config", tmp_path / "list.yaml", "--job", "j", check=False), "plan",
                   f"{tmp_path / 'list.yaml'}: jobs: ['a', 'b'] is not of type 'object'", exact=True)
    (tmp_path / "top.yaml").write_text("- jobs\n")
    one_line_error(fx.run_main("status", "--config", tmp_path / "top.yaml", "--job", "j", check=False), "status",
                   f"{tmp_path / 'top.yaml'}: must be a mapping with a 'jobs' section, got list", exact=True)


def test_quoted_multi_line_errors_print_as_one_line(tmp_path, monkeypatch):
    (tmp_path / "loud_runners.py").write_text("raise ValueError('first line\\n  second line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = job_config(tmp_path, runner="loud_runners.Runner")
    loud = fx.run_main("plan", "--config", config, "--job", "j", check=False)
    one_line_error(loud, "plan", "importing 'loud_runners' raised ValueError: first line   second line")


def test_manifest_errors_are_one_line(tmp_path):
    missing = tmp_path / "out" / "manifest.json"
    for command in ("status", "merge"):
        one_line_error(fx.run_main(command, "--manifest", missing, check=False), command,
                       f"{missing}: manifest not found; run the plan step first", exact=True)
    one_line_error(fx.run_main("run-shard", "--manifest", missing, "--shard", 0, check=False), "run-shard",
                   f"{missing}: manifest not found")
    missing.parent.mkdir()
    missing.write_text('{"version": 2, ')
    one_line_error(fx.run_main("status", "--manifest", missing, check=False), "status",
                   f"{missing}: manifest is not valid JSON (")
    missing.write_text(json.dumps({"version": 1, "spec": {}, "output_dir": "out", "shards": []}))
    one_line_error(fx.run_main("status", "--manifest", missing, check=False), "status",
                   f"{missing}: manifest version 1 is not 2; run the plan step again", exact=True)


def test_run_shard_errors_are_one_line(tmp_path):
    config = job_config(tmp_path)
    fx.run_main("plan", "--config", config, "--job", "j")
    manifest = tmp_path / "out" / "manifest.json"
    one_line_error(fx.run_main("run-shard", "--manifest", manifest, "--shard", 3, check=False), "run-shard",
                   "shard 3 does not exist; the plan has shards 0..2", exact=True)
    assert not (tmp_path / "out" / "split.3").exists()

    job_config(tmp_path, runner="toys.MyTextRunner", provider="toys.RenamedProvider", items=2, n_shards=1)
    fx.run_main("plan", "--config", config, "--job", "j")
    plan = read_manifest(manifest)
    env = {**fx.RenamedProvider({}).build_env_local(), "device": "cpu"}  # run-shard adds the device key
    message = engine_error(lambda: run_shard(fx.MyTextRunner, plan, 0, env, "RenamedProvider"))
    one_line_error(fx.run_main("run-shard", "--manifest", manifest, "--shard", 0, check=False), "run-shard", message,
                   exact=True)
    assert not (tmp_path / "out" / "split.0").exists()


# ----------------------------------------------------------- jobs from the config
def test_test_sets_are_jobs_of_their_own(tmp_path):
    config = job_config(tmp_path, shard_subdir="decode", provider_config={"n": 9, "lang": "en"}, params=None,
                        test_sets=[{"name": "a"}, {"name": "b", "provider_config": {"n": 4}, "items": 3}])
    jobs = jobs_from_config(read_config(config))
    out = (tmp_path / "out").as_posix()
    assert sorted(jobs) == [f"{out}/decode/a", f"{out}/decode/b"]
    b = jobs[f"{out}/decode/b"]
    assert (b.name, b.test_set, b.shard_subdir, b.provider_config, b.items) == (
        "j", "b", "decode/b", {"n": 4, "lang": "en"}, 3)
    one_line_error(fx.run_main("plan", "--config", config, "--job", "j", check=False), "plan",
                   "job 'j' names several test sets; jobs are ['j/a', 'j/b']", exact=True)
    assert fx.run_main("plan", "--config", config, "--job", "j/b").returncode == 0
    assert read_manifest(tmp_path / "out" / "decode" / "b" / "manifest.json").job == b
    assert not (tmp_path / "out" / "decode" / "a").exists()


def test_shard_resources_default_and_grow_per_attempt():
    job = JobSpec(name="j", runner="r.R", provider="p.P", output_dir="o",
                  resources={"mem_mb": 1000, "runtime": 10, "attempt_scale": 2, "slurm_partition": "gpu"})
    assert [shard_resource(job, "mem_mb", attempt) for attempt in (1, 2, 3)] == [1000, 2000, 4000]
    assert shard_resource(job, "runtime", 2) == 20
    assert shard_resource(job, "threads", 3) == 1 and shard_resource(job, "slurm_partition") == "gpu"
    assert shard_resource(job, "group") == DEFAULT_RESOURCES["group"] == ""
    assert shard_resource(JobSpec(name="j", runner="r.R", provider="p.P", output_dir="o",
                                  resources={"group": "g"}), "group") == "g"
    default = JobSpec(name="j", runner="r.R", provider="p.P", output_dir="o")
    assert shard_resource(default, "mem_mb", 2) == 3000, "default attempt_scale 1.5"
