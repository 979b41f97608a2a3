"""ESPnet3 contracts: providers, runner constructor, env injection, batching, writer hooks, merge."""

from __future__ import annotations

import inspect
import pickle

import toys as fx
from espnet3_rules import BaseRunner, InferenceRunner, concatenate_shard_files
from espnet3_rules.engine.job import JobSpec
from espnet3_rules.engine.plan import plan_job
from espnet3_rules.engine.shard import build_worker_env, run_shard


def words(n, **extra_env):
    """SampleProvider over ``n`` utterances with extra env keys."""
    return fx.SampleProvider({"n": n, "extra_env": extra_env})


# ------------------------------------------------------------- providers
def test_inference_provider_builds_env_once_and_hands_out_shallow_copies(tmp_path):
    provider = fx.CountingInferenceProvider({"n": 3, "log_dir": str(tmp_path)}, params={"beam": 2})
    assert fx.read_lines(tmp_path / "builds") == [], "nothing is built before the env is needed"
    first, second = provider.build_env_local(), provider.build_env_local()
    assert fx.read_lines(tmp_path / "builds") == ["dataset", "model"]
    assert first is not second and first == second
    assert first["model"] is second["model"] and first["dataset"] is second["dataset"]
    first["extra"] = 1
    del first["model"]
    assert set(provider.build_env_local()) == {"dataset", "model", "beam"}


def test_runner_builds_the_local_env_once_for_all_shards(tmp_path):
    provider = fx.CountingInferenceProvider({"n": 6, "log_dir": str(tmp_path)})
    runner = fx.CollectRunner(provider, output_dir=tmp_path / "out", n_shards=3)
    assert [r["idx"] for r in runner(range(6))] == list(range(6))
    assert fx.read_lines(tmp_path / "builds") == ["dataset", "model"]


def test_plan_step_never_builds_the_model(tmp_path):
    job = JobSpec(name="j", runner="toys.CollectRunner", provider="toys.CountingInferenceProvider",
                  output_dir=str(tmp_path / "out"), n_shards=2, provider_config={"n": 4, "log_dir": str(tmp_path)})
    assert plan_job(job).n_items == 4
    assert fx.read_lines(tmp_path / "builds") == ["dataset"]


def test_legacy_make_worker_setup_fn_still_works(tmp_path):
    provider = fx.LegacyProvider({"n": 3, "log_dir": str(tmp_path)})
    runner = fx.MyTextRunner(provider, output_dir=tmp_path / "out")
    plan = fx.plan_of(runner, range(3))
    run_shard(type(runner), plan, 0, build_worker_env(provider))
    assert fx.read_lines(tmp_path / "builds") == ["legacy-setup", "env"]
    assert (plan.shard_dir(0) / "text").read_text() == fx.expected_text(range(3))


# ------------------------------------------------------- runner contract
def test_base_runner_constructor_takes_espnet3_arguments(tmp_path):
    params = list(inspect.signature(BaseRunner.__init__).parameters.values())
    espnet3 = [("provider", inspect.Parameter.empty), ("batch_size", None), ("output_dir", None),
               ("shard_subdir", ""), ("resume", True)]
    assert [(p.name, p.default) for p in params[1:6]] == espnet3
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[1:6]), "ESPnet3 subclasses pass them positionally"
    provider = words(2)
    runner = fx.CollectRunner(provider, 2, str(tmp_path), None, False)
    assert (runner.provider, runner.batch_size, runner.output_dir, runner.shard_subdir, runner.resume) == (
        provider, 2, tmp_path, "", False)


def test_forward_without_var_kwargs_gets_only_its_names(tmp_path):
    provider = words(3, device="cpu", tokenizer="tok", calls_file=str(tmp_path / "unused"))
    runner = fx.ExplicitRunner(provider, output_dir=tmp_path, n_shards=2)
    assert runner(range(3)) == [[0, "cpu", "W0"], [1, "cpu", "W1"], [2, "cpu", "W2"]]


def test_keyword_only_forward_and_defaults_for_names_no_env_gives(tmp_path):
    assert fx.KeywordOnlyRunner(words(2), output_dir=tmp_path)(range(2)) == [[0, 1, "W0"], [1, 1, "W1"]]
    assert fx.KeywordOnlyRunner(words(1, beam=4), output_dir=tmp_path / "beam")(range(1)) == [[0, 4, "W0"]]


def test_var_kwargs_forward_gets_every_env_key(tmp_path):
    runner = fx.EnvKeysRunner(words(2, device="cpu", tokenizer="tok"), output_dir=tmp_path, shard_subdir="dev")
    assert runner(range(2)) == [["device", "output_dir", "shard_subdir", "tokenizer"]] * 2


def test_batch_aware_forward_gets_lists_of_batch_size(tmp_path):
    runner = fx.BatchRunner(words(8), batch_size=3, output_dir=tmp_path, n_shards=2)
    results = runner(range(8))
    assert [(r["kind"], r["idx"]) for r in results] == [("list", [0, 1, 2]), ("list", [3, 4, 5]), ("list", [6, 7])]
    assert results[2]["hyp"] == ["W6", "W7"]
    assert [len(s) for s in fx.plan_of(runner, range(8)).shards] == [2, 1]
    unbatched = fx.BatchRunner(words(3), output_dir=tmp_path / "u")(range(3))
    assert [(r["kind"], r["idx"]) for r in unbatched] == [("one", 0), ("one", 1), ("one", 2)]


# ----------------------------------------------------------- writer hooks
def test_docs_text_runner_writes_text_per_shard_and_merges(tmp_path):
    runner = fx.MyTextRunner(words(10), output_dir=tmp_path, shard_subdir="test", n_shards=3)
    assert runner(range(10)) == {}
    root = tmp_path / "test"
    assert [(root / f"split.{i}" / "text").read_text() for i in range(3)] == [
        fx.expected_text(range(0, 4)), fx.expected_text(range(4, 7)), fx.expected_text(range(7, 10))]
    assert (root / "text").read_text() == fx.expected_text(range(10))
    assert fx.state_of(root / "split.1") == {"shard_id": 1, "shard_dir": str(root / "split.1"),
                                                          "records": []}


def test_close_writers_with_state_and_env_and_hooks_take_env_by_name(tmp_path):
    runner = fx.StateCloseRunner(words(5, prefix="hyp_"), output_dir=tmp_path, n_shards=2)
    runner(range(5))
    state = fx.state_of(tmp_path / "split.1")
    assert state["closed"] == {"shard_id": 1, "n_written": 2, "prefix": "hyp_"}
    assert "_writers" not in state
    assert (tmp_path / "split.1" / "hyp_text").read_text() == "utt003 W3 shard=1\nutt004 W4 shard=1\n"


def test_default_runner_merges_records_from_shard_state_files_written_by_other_processes(tmp_path):
    config = fx.write_config(tmp_path / "c.yaml", runner="toys.CollectRunner",
                             provider="toys.SampleProvider", provider_config={"n": 7},
                             output_dir=str(tmp_path / "out"), n_shards=3)
    fx.run_main("plan", "--config", config, "--job", "j")
    for shard in range(3):
        fx.cli("run-shard", "--manifest", tmp_path / "out" / "manifest.json", "--shard", shard)
    runner = fx.CollectRunner(words(7), output_dir=tmp_path / "out", n_shards=3)
    shard_dirs = [tmp_path / "out" / f"split.{i}" for i in range(3)]
    with (shard_dirs[2] / "_state.pkl").open("rb") as f:
        assert [r["idx"] for r in pickle.load(f)["records"]] == [5, 6]
    assert runner.merge(shard_dirs) == [
        {"idx": i, "utt_id": f"utt{i:03d}", "score": float(len(f"w{i}"))} for i in range(7)]


# ------------------------------------------------------- InferenceRunner
def inference_runner(tmp_path, n=12, n_shards=12, **kwargs):
    provider = fx.CountingInferenceProvider({"n": n})
    return InferenceRunner(provider, output_dir=tmp_path, shard_subdir="dev", n_shards=n_shards,
                           input_key="word", output_fn="toys.to_record", **kwargs)


def test_inference_runner_writes_scp_per_field_and_merges_in_shard_id_order(tmp_path):
    assert inference_runner(tmp_path)(range(12)) is True  # as ESPnet3's runner(indices)
    root = tmp_path / "dev"
    assert sorted(p.name for p in root.glob("*.scp")) == ["length.scp", "text.scp"]
    assert (root / "split.11" / "text.scp").read_text() == "utt011 W11\n"
    assert (root / "split.10" / "field_keys.txt").read_text() == "length\ntext\n"
    assert (root / "text.scp").read_text() == "".join(f"utt{i:03d} W{i}\n" for i in range(12)), \
        "split.10 and split.11 come after split.9"
    assert (root / "length.scp").read_text() == "".join(f"utt{i:03d} {len(f'W{i}')}\n" for i in range(12))


def test_inference_runner_output_keys_and_batches(tmp_path):
    runner = inference_runner(tmp_path, n=5, n_shards=2, batch_size=2, output_keys="text")
    runner(range(5))
    assert sorted(p.name for p in (tmp_path / "dev").glob("*.scp")) == ["text.scp"]
    assert (tmp_path / "dev" / "split.0" / "text.scp").read_text() == "utt000 W0\nutt001 W1\nutt002 W2\nutt003 W3\n"
    assert not (tmp_path / "dev" / "split.0" / "length.scp").exists()


def test_concatenate_shard_files_orders_skips_missing_and_replaces_atomically(tmp_path):
    dirs = [tmp_path / f"split.{i}" for i in range(12)]
    for i, shard_dir in enumerate(dirs):
        shard_dir.mkdir()
        if i != 3:
            (shard_dir / "x.scp").write_text(f"u{i} é{i}\n", encoding="utf-8")
    out = tmp_path / "merged" / "x.scp"
    out.parent.mkdir()
    out.write_text("stale\n")
    assert concatenate_shard_files(dirs, "x.scp", out) is True
    assert out.read_text(encoding="utf-8") == "".join(f"u{i} é{i}\n" for i in range(12) if i != 3)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.scp"], "no temp file is left behind"
    assert concatenate_shard_files(dirs, "y.scp", tmp_path / "merged" / "x.scp") is False
    assert not out.exists()

