"""Python API: ``runner(indices)`` returns merge's value and shares the CLI's engine and layout."""

from __future__ import annotations

import json

import pytest

import toys as fx
from espnet3_rules.engine.job import JobSpec, build_runner
from espnet3_rules.engine.plan import read_manifest


def words_provider(tmp_path, n):
    """SampleProvider whose forward calls (ProbeTextRunner) are logged to ``tmp_path/calls``."""
    return fx.SampleProvider({"n": n, "extra_env": {"calls_file": str(tmp_path / "calls")}})


def config_for(tmp_path, n, n_shards):
    """The same job as ``ProbeTextRunner(words_provider(...))``, as a YAML config."""
    return fx.write_config(tmp_path / "c.yaml", runner="toys.ProbeTextRunner",
                           provider="toys.SampleProvider", output_dir=str(tmp_path / "out"),
                           shard_subdir="test", n_shards=n_shards,
                           provider_config={"n": n, "extra_env": {"calls_file": str(tmp_path / "calls")}})


def test_runner_returns_merge_value_with_shards_in_id_order(tmp_path):
    runner = fx.ShardOrderRunner(fx.SampleProvider({"n": 12}), output_dir=tmp_path, n_shards=12)
    assert runner(range(12)) == [f"split.{i}" for i in range(12)]


def test_python_api_run_is_what_the_cli_sees(tmp_path):
    runner = fx.ProbeTextRunner(words_provider(tmp_path, 7), output_dir=tmp_path / "out", shard_subdir="test",
                                n_shards=3)
    assert runner(range(7)) == {}
    root = tmp_path / "out" / "test"
    plan = read_manifest(root / "manifest.json")
    assert plan.shards == [[0, 1, 2], [3, 4], [5, 6]]
    assert all(json.loads((root / f"split.{i}" / "done").read_text())["fingerprint"] == plan.fingerprint
               for i in range(3))
    assert json.loads((root / "merge.done").read_text())["fingerprint"] == plan.fingerprint
    python_text = (root / "text").read_bytes()
    assert python_text == fx.expected_text(range(7)).encode()

    status = fx.run_main("status", "--manifest", root / "manifest.json")
    assert "3 done, pending: none" in status.stdout
    (root / "text").unlink()
    fx.run_main("merge", "--manifest", root / "manifest.json")
    assert (root / "text").read_bytes() == python_text

    manifest = (root / "manifest.json").read_text()
    fx.run_main("plan", "--config", config_for(tmp_path, 7, 3), "--job", "j")
    assert json.loads((root / "manifest.json").read_text())["fingerprint"] == json.loads(manifest)["fingerprint"], \
        "the plan step of the same job leaves the Python API's shards valid"
    assert fx.run_main("status", "--config", tmp_path / "c.yaml", "--job", "j").returncode == 0


def test_shards_run_by_the_cli_are_resumed_by_the_python_api(tmp_path):
    config = config_for(tmp_path, 8, 3)
    fx.run_main("plan", "--config", config, "--job", "j")
    for shard in range(3):
        fx.run_main("run-shard", "--config", config, "--job", "j", "--shard", shard)
    assert sorted(fx.read_lines(tmp_path / "calls"), key=int) == [str(i) for i in range(8)]
    (tmp_path / "calls").unlink()

    runner = fx.ProbeTextRunner(words_provider(tmp_path, 8), output_dir=tmp_path / "out", shard_subdir="test",
                                n_shards=3)
    assert runner(range(8)) == {}
    assert fx.read_lines(tmp_path / "calls") == [], "every shard the CLI ran counts as done"
    assert (tmp_path / "out" / "test" / "text").read_text() == fx.expected_text(range(8))


def test_shards_of_an_inference_job_with_params_run_by_the_cli_are_resumed_by_the_python_api(tmp_path):
    params = {"calls_file": str(tmp_path / "calls")}
    provider_config = {"n": 4, "suffix": "!"}  # the builders see the config, not the params (as in ESPnet3)
    config = fx.write_config(tmp_path / "c.yaml", runner="toys.CollectRunner",
                             provider="toys.CountingInferenceProvider", provider_config=provider_config, params=params,
                             output_dir=str(tmp_path / "out"), n_shards=2)
    fx.run_main("plan", "--config", config, "--job", "j")
    for shard in range(2):
        fx.run_main("run-shard", "--config", config, "--job", "j", "--shard", shard)
    (tmp_path / "calls").unlink()
    runner = fx.CollectRunner(fx.CountingInferenceProvider(provider_config, params=params), output_dir=tmp_path / "out",
                              n_shards=2)
    assert fx.plan_of(runner, range(4)).fingerprint == read_manifest(tmp_path / "out" / "manifest.json").fingerprint
    assert [r["score"] for r in runner(range(4))] == [3.0] * 4
    assert fx.read_lines(tmp_path / "calls") == [], "every shard the CLI ran counts as done"


# ------------------------------------------------------------- runner options
def beam_runner(tmp_path, beam, n=6, n_shards=3):
    """BeamRunner over SampleProvider(n), forward calls logged to ``tmp_path/calls``."""
    provider = fx.SampleProvider({"n": n, "extra_env": {"calls_file": str(tmp_path / "calls")}})
    return fx.BeamRunner(provider, beam=beam, output_dir=tmp_path / "out", n_shards=n_shards)


def done_times(tmp_path, n_shards=3):
    return [(tmp_path / "out" / f"split.{i}" / "done").stat().st_mtime_ns for i in range(n_shards)]


def test_a_runner_option_reaches_every_shard_and_the_merge(tmp_path):
    result = beam_runner(tmp_path, 5)(range(6))
    assert fx.read_lines(tmp_path / "calls") == [f"{i} beam=5" for i in range(6)], "forward saw beam=5 in each shard"
    assert [r["beam"] for r in result["records"]] == [5] * 6 and result["merge_beam"] == 5
    assert (tmp_path / "out" / "merged").read_text().splitlines()[-1] == "merge beam=5"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["job"]["runner_kwargs"] == {"beam": 5}
    assert manifest["job"]["runner"] == "toys.BeamRunner"


def test_a_changed_runner_option_reruns_every_shard_and_the_same_one_none(tmp_path):
    five, seven = beam_runner(tmp_path, 5), beam_runner(tmp_path, 7)
    assert fx.plan_of(five, range(6)).fingerprint != fx.plan_of(seven, range(6)).fingerprint
    assert fx.plan_of(five, range(6)).fingerprint == fx.plan_of(beam_runner(tmp_path, 5), range(6)).fingerprint

    five(range(6))
    first = done_times(tmp_path)
    (tmp_path / "calls").unlink()
    assert beam_runner(tmp_path, 5)(range(6))["merge_beam"] == 5
    assert fx.read_lines(tmp_path / "calls") == [] and done_times(tmp_path) == first, "beam=5 again: no shard reruns"

    result = seven(range(6))
    assert fx.read_lines(tmp_path / "calls") == [f"{i} beam=7" for i in range(6)], "beam=7: every shard reruns"
    assert all(after > before for after, before in zip(done_times(tmp_path), first))
    assert [r["beam"] for r in result["records"]] == [7] * 6 and result["merge_beam"] == 7
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["job"]["runner_kwargs"] == {"beam": 7}


def test_a_provider_env_entry_of_the_same_name_wins_over_the_runner_option_in_the_hooks(tmp_path):
    provider = fx.SampleProvider({"n": 2, "extra_env": {"beam": 9}})
    result = fx.BeamRunner(provider, beam=5, output_dir=tmp_path)(range(2))
    assert [r["beam"] for r in result["records"]] == [9, 9] and result["merge_beam"] == 5


def test_a_positional_runner_option_is_recorded_by_name(tmp_path):
    provider = fx.SampleProvider({"n": 2})
    assert fx.BeamRunner(provider, 3, output_dir=tmp_path).job_spec().runner_kwargs == {"beam": 3}
    assert fx.BeamRunner(provider, output_dir=tmp_path).job_spec().runner_kwargs == {}, "a default is not recorded"


def test_job_spec_of_a_live_runner_is_what_the_shards_rebuild_it_from(tmp_path):
    runner = fx.BeamRunner(fx.CountingInferenceProvider({"n": 4}), beam=2, batch_size=2, output_dir=tmp_path,
                           shard_subdir="dev", n_shards=2, resume=False)
    assert runner.job_spec() == JobSpec(name="BeamRunner", runner="toys.BeamRunner",
                                        provider="toys.CountingInferenceProvider", output_dir=str(tmp_path),
                                        shard_subdir="dev", n_shards=2, batch_size=2, provider_config={"n": 4},
                                        runner_kwargs={"beam": 2})
    rebuilt = build_runner(runner.job_spec())
    assert (type(rebuilt), rebuilt.beam, rebuilt.batch_size, rebuilt.output_dir, rebuilt.shard_subdir) == (
        fx.BeamRunner, 2, 2, tmp_path, "dev")
    assert rebuilt.provider.config == {"n": 4}


def test_a_classmethod_forward_runs_through_the_python_api(tmp_path):
    runner = fx.ClassForwardRunner(fx.SampleProvider({"n": 5}), output_dir=tmp_path, n_shards=2)
    assert runner(range(5)) == [{"idx": i, "by": "ClassForwardRunner", "tag": "cls", "hyp": f"W{i}"} for i in range(5)]
