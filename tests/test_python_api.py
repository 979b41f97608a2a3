"""Python API: ``runner(indices)`` returns merge's value and shares the CLI's engine and layout."""

from __future__ import annotations

import json

import pytest

from omegaconf import OmegaConf

import toys as fx
from espnet3_rules import BaseRunner
from espnet3_rules.engine.job import JobSpec, build_runner
from espnet3_rules.engine.merge import completed_shard_dirs
from espnet3_rules.engine.plan import read_manifest
from espnet3_rules.parallel import parallel
from espnet3_rules.parallel.parallel import get_parallel_config, set_parallel


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
    assert "3 done, 0 running, 0 failed, 0 pending" in status.stdout
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


# ------------------------------------------------ ESPnet3 202611 BaseRunner conformance
@pytest.fixture(autouse=True)
def no_parallel_config(monkeypatch):
    """Each test starts without a parallel config (set_parallel keeps one module-level config)."""
    monkeypatch.setattr(parallel, "parallel_config", None)


def helper_config(tmp_path, runner):
    return fx.write_config(tmp_path / "c.yaml", runner=runner, provider="toys.SampleProvider",
                           output_dir=str(tmp_path / "cli"), n_shards=2, provider_config={"n": 3})


@pytest.mark.parametrize("runner_cls, expected", [
    (fx.ClassHelperRunner, [{"idx": i, "label": f"A{i}", "hyp": f"w{i}"} for i in range(3)]),
    (fx.SubClassHelperRunner, [{"idx": i, "label": f"B{i}", "hyp": f"<W{i}>"} for i in range(3)]),
])
def test_a_classmethod_forward_calls_its_cls_helpers_in_process_and_in_a_shard_process(tmp_path, runner_cls,
                                                                                      expected):
    assert runner_cls(fx.SampleProvider({"n": 3}), output_dir=tmp_path / "api", n_shards=2)(range(3)) == expected
    config = helper_config(tmp_path, f"toys.{runner_cls.__name__}")
    fx.run_main("plan", "--config", config, "--job", "j")
    for shard in range(2):
        fx.cli("run-shard", "--config", config, "--job", "j", "--shard", shard)
    assert fx.run_main("merge", "--config", config, "--job", "j").returncode == 0
    assert fx.state_of(tmp_path / "cli" / "split.0")["records"] + fx.state_of(tmp_path / "cli" / "split.1")[
        "records"] == expected


def test_an_instance_method_forward_is_a_type_error_before_anything_runs(tmp_path):
    with pytest.raises(TypeError):  # ESPnet3: cls.forward(item, ...) without an instance; message: test_common_mistakes
        fx.SelfRunner(fx.SampleProvider({"n": 2}), output_dir=tmp_path)(range(2))
    assert list(tmp_path.iterdir()) == []


def test_error_types_are_espnet3s(tmp_path):
    provider = fx.SampleProvider({"n": 4})
    with pytest.raises(RuntimeError):  # message: test_common_mistakes
        fx.CollectRunner(provider)(range(4))
    with pytest.raises(ValueError, match="^batch_size must be a positive integer"):
        fx.CollectRunner(provider, batch_size=0, output_dir=tmp_path)(range(4))
    runner = fx.CollectRunner(provider, output_dir=tmp_path, n_shards=2)
    runner(range(4))
    (tmp_path / "split.1" / "done").unlink()
    with pytest.raises(FileNotFoundError):  # message: test_cli
        completed_shard_dirs(fx.plan_of(runner, range(4)))
    with pytest.raises(TypeError):  # ESPnet3: build_worker_setup_fn is abstract; message: test_common_mistakes
        fx.LocalOnlyProvider({"n": 2}).build_worker_setup_fn()


def test_is_shard_done_is_true_for_a_readable_done_record(tmp_path):
    fx.CollectRunner(fx.SampleProvider({"n": 2}), output_dir=tmp_path / "a")(range(2))
    shard = tmp_path / "a" / "split.0"
    assert BaseRunner.is_shard_done(shard) and fx.CollectRunner.is_shard_done(str(shard))
    (shard / "done").write_text('{"fingerprint": "of another plan"}')
    assert fx.CollectRunner.is_shard_done(shard), "a completion marker, whatever plan wrote it"
    (shard / "done").write_text("")
    assert not fx.CollectRunner.is_shard_done(shard), "an empty (torn) done is no record"
    assert not fx.CollectRunner.is_shard_done(tmp_path / "missing")


def test_an_is_shard_done_override_is_asked_too_before_a_shard_is_skipped(tmp_path):
    provider = fx.SampleProvider({"n": 4, "extra_env": {"calls_file": str(tmp_path / "calls")}})
    runner = fx.NeedsShardFileRunner(provider, output_dir=tmp_path / "out", n_shards=2)
    runner(range(4))
    (tmp_path / "out" / "split.1" / "keep").touch()
    records = runner(range(4))
    assert fx.read_lines(tmp_path / "calls") == ["0", "1", "2", "3", "0", "1"], "split.0 again, split.1 skipped"
    assert [r["idx"] for r in records] == [0, 1, 2, 3]

def test_close_writers_gets_the_state_positionally_before_the_writers_leave_it(tmp_path):
    fx.PositionalCloseRunner(fx.SampleProvider({"n": 3}), output_dir=tmp_path)(range(3))
    state = fx.state_of(tmp_path / "split.0")
    assert (state["n_closed"], state["saw_writers"], "_writers" in state) == (3, True, False)


# ---------------------------------------------------- resume over another shard plan
def collect(tmp_path, n=6, **kwargs):
    """A BatchRunner over SampleProvider(n) in ``tmp_path/out``, forward calls logged to ``tmp_path/calls``."""
    provider = fx.SampleProvider({"n": n, "extra_env": {"calls_file": str(tmp_path / "calls")}})
    return fx.BatchRunner(provider, output_dir=tmp_path / "out", **kwargs)


def test_resume_with_another_number_of_shards_is_refused_and_deletes_nothing(tmp_path):
    collect(tmp_path, n_shards=3)(range(6))
    before = fx.snapshot(tmp_path / "out")
    manifest = tmp_path / "out" / "manifest.json"
    with pytest.raises(RuntimeError) as info:
        collect(tmp_path, n_shards=2)(range(6))
    assert str(info.value) == (
        f"Cannot resume with a different number of parallel shards: {manifest} has 3 shard(s), but this run "
        "planned 2; re-run with the original settings, pass resume=False to replan and overwrite, or remove "
        f"the existing shard outputs under {tmp_path / 'out'}")
    assert fx.snapshot(tmp_path / "out") == before


@pytest.mark.parametrize("change, indices, shard", [
    (dict(batch_size=2), range(6), "split.0 (of 3 changed shard(s)) holds 2 item(s) 0..1, this run 1 batch(es) [0, 1]..[0, 1]"),
    (dict(n=7), [0, 1, 2, 3, 4, 6], "split.2 (of 1 changed shard(s)) holds 2 item(s) 4..5, this run 2 item(s) 4..6"),
])
def test_resume_over_other_items_or_batching_is_refused(tmp_path, change, indices, shard):
    collect(tmp_path, n_shards=3)(range(6))
    before = fx.snapshot(tmp_path / "out")
    with pytest.raises(RuntimeError, match="^Cannot resume because the shard plan changed: in ") as info:
        collect(tmp_path, n_shards=3, **change)(indices)
    assert f"manifest.json, {shard} (other indices or batch_size)" in str(info.value)
    assert fx.snapshot(tmp_path / "out") == before


def test_resume_false_replans_overwrites_and_reruns_every_shard(tmp_path):
    collect(tmp_path, n_shards=3)(range(6))
    (tmp_path / "calls").write_text("")
    result = collect(tmp_path, n_shards=2, batch_size=2, resume=False)(range(6))
    assert [r["idx"] for r in result] == [[0, 1], [2, 3], [4, 5]]
    assert fx.read_lines(tmp_path / "calls") == ["[0, 1]", "[2, 3]", "[4, 5]"]
    assert read_manifest(tmp_path / "out" / "manifest.json").n_shards == 2


def test_resume_false_reruns_done_shards_of_the_same_plan(tmp_path):
    collect(tmp_path, n_shards=2)(range(6))
    (tmp_path / "calls").write_text("")
    collect(tmp_path, n_shards=2, resume=False)(range(6))
    assert fx.read_lines(tmp_path / "calls") == [str(i) for i in range(6)]


def test_resume_over_a_manifest_without_shards_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text('{"version": 1}')
    with pytest.raises(RuntimeError, match=r"^Shard manifest is missing 'shards': .*manifest\.json$"):
        collect(tmp_path)(range(6))


def test_the_cli_plan_step_replans_over_a_python_api_manifest_of_another_layout(tmp_path):
    runner = fx.ProbeTextRunner(words_provider(tmp_path, 7), output_dir=tmp_path / "out", shard_subdir="test",
                                n_shards=2)
    runner(range(7))
    fx.run_main("plan", "--config", config_for(tmp_path, 7, 3), "--job", "j")
    assert read_manifest(tmp_path / "out" / "test" / "manifest.json").n_shards == 3, "Snakemake's params change replans"


# ----------------------------------------------------------------- parallel config
@pytest.mark.parametrize("config, n_shards, shards", [
    (None, None, 1),
    ({"env": "local", "n_workers": 3}, None, 3),
    ({"env": "local", "n_workers": 10, "options": {"threads_per_worker": 1}}, None, 6),  # at most one shard per item
    ({"n_workers": 0}, None, 1),
    ({"n_workers": 3}, 2, 2),  # an explicit n_shards wins
])
def test_shards_come_from_n_workers_when_n_shards_is_not_given(tmp_path, config, n_shards, shards):
    if config is not None:
        set_parallel(config)
    runner = collect(tmp_path, n_shards=n_shards)
    assert [r["idx"] for r in runner(range(6))] == list(range(6))
    assert read_manifest(tmp_path / "out" / "manifest.json").n_shards == shards
    assert sorted(p.name for p in (tmp_path / "out").glob("split.*")) == [f"split.{i}" for i in range(shards)]


def test_set_parallel_stores_a_copy_and_none_keeps_or_defaults_it():
    set_parallel(None)
    assert OmegaConf.to_container(get_parallel_config()) == {"env": "local", "n_workers": 1, "options": {}}
    given = OmegaConf.create({"env": "local", "n_workers": 2, "allow_overwrite_lock": True})
    set_parallel(given)
    given.n_workers = 5
    set_parallel(None)
    assert (get_parallel_config().n_workers, get_parallel_config().allow_overwrite_lock) == (2, True)
    assert get_parallel_config().options == {}
    with pytest.raises(TypeError, match=r"^set_parallel\(\) takes a mapping or DictConfig \(or None\), got str$"):
        set_parallel("local")
