"""The two InferenceProviders as ESPnet3 202611 has them: ``espnet3.parallel.inference_provider``
(env cached in ``_local_env``, params kept out of the config) and ``espnet3.systems.base.inference_provider``
(params merged into the config, Hydra-built dataset and model, a fresh env per call)."""

from __future__ import annotations

import os
import sys

import pytest
from omegaconf import OmegaConf

import toys as fx
from espnet3_rules.engine.job import JobSpec, build_provider, count_items_without_building, declared_env_keys
from espnet3_rules.engine.plan import plan_job
from espnet3_rules.engine.shard import build_worker_env
from espnet3_rules.parallel.env_provider import EnvironmentProvider
from espnet3_rules.parallel.inference_provider import InferenceProvider as ParallelInferenceProvider
from espnet3_rules.systems.base.inference_provider import InferenceProvider

SYSTEMS = "espnet3_rules.systems.base.inference_provider.InferenceProvider"


def builds(tmp_path):
    return fx.read_lines(tmp_path / "builds")


def systems_config(tmp_path, test_set="b", **model):
    """A systems-provider config: organizer with test sets a (2 items) and b (3), ToyModel, all builds logged."""
    log_dir = str(tmp_path)
    return {
        "dataset": {"_target_": "toys.ToyOrganizer", "test_sizes": {"a": 2, "b": 3}, "log_dir": log_dir},
        "model": {"_target_": "toys.ToyModel", "log_dir": log_dir, **model},
        "test_set": test_set,
    }


def counting_job(tmp_path, provider="toys.CountingInferenceProvider", **fields):
    return JobSpec(name="j", runner="toys.CollectRunner", provider=provider, output_dir=str(tmp_path / "out"),
                   n_shards=2, **{"provider_config": {"n": 4, "log_dir": str(tmp_path)}, **fields})


# ------------------------------------------------------------- parallel provider
def test_parallel_local_env_is_built_on_first_read_then_kept(tmp_path):
    provider = fx.CountingInferenceProvider({"n": 3, "log_dir": str(tmp_path)}, params={"beam": 2})
    assert builds(tmp_path) == [], "constructing builds nothing (ESPnet3 builds here; we build on first read)"
    env = provider._local_env
    assert set(env) == {"dataset", "model", "beam"} and len(env["dataset"]) == 3
    assert provider._local_env is env and provider.build_env_local() == env
    assert builds(tmp_path) == ["dataset", "model"]


def test_parallel_params_stay_out_of_the_config_but_enter_the_env():
    config = OmegaConf.create({"n": 2})
    provider = fx.CountingInferenceProvider(config, params={"suffix": "!", "device": "cpu"})
    assert provider.config is config and "suffix" not in config, "ESPnet3's parallel provider does not merge params"
    env = provider.build_env_local()
    assert env["suffix"] == "!" and env["device"] == "cpu"
    assert env["model"](word="ab") == "AB", "build_model saw the config as given"
    assert type(provider).declared_env_keys(provider.params) == {"dataset", "model", "suffix", "device"}
    assert fx.CountingInferenceProvider(None).config == {}


def test_parallel_worker_setup_fn_builds_afresh_with_the_params_of_its_making(tmp_path):
    provider = fx.CountingInferenceProvider({"n": 2, "log_dir": str(tmp_path)}, params={"token": "v1"})
    setup = provider.build_worker_setup_fn()
    provider.params["token"] = "v2"
    first, second = setup(), setup()
    assert first["token"] == second["token"] == "v1"
    assert first["model"] is not second["model"] and first["dataset"] is not second["dataset"]
    assert builds(tmp_path) == ["dataset", "model"] * 2, "ESPnet3 counts one more pair: its __init__ builds too"


def test_parallel_plan_builds_no_model_and_each_shard_process_one(tmp_path):
    job = counting_job(tmp_path)
    assert count_items_without_building(job) == 4 and plan_job(job).n_items == 4
    assert builds(tmp_path) == ["dataset", "dataset"]
    for shard in range(2):  # what `run-shard` does in each shard process
        build_worker_env(build_provider(job))
    assert builds(tmp_path) == ["dataset", "dataset"] + ["dataset", "model"] * 2


def test_parallel_subclass_reading_local_env_in_its_init_gets_the_built_env(tmp_path):
    provider = fx.EagerEnvProvider({"n": 5, "log_dir": str(tmp_path)})
    assert provider.n_items == 5 and builds(tmp_path) == ["dataset", "model"]
    runner = fx.CollectRunner(provider, output_dir=tmp_path / "out", n_shards=2)
    assert [r["idx"] for r in runner(range(5))] == list(range(5))
    assert builds(tmp_path) == ["dataset", "model"], "runner(indices) reuses the env the subclass read"
    # Such a subclass builds when constructed: the plan step then builds its model once, and a shard
    # process twice (construction, then the setup function), as ESPnet3's driver and worker would.
    job = counting_job(tmp_path, provider="toys.EagerEnvProvider")
    plan_job(job)
    assert builds(tmp_path)[2:] == ["dataset", "model", "dataset"]
    build_worker_env(build_provider(job))
    assert builds(tmp_path)[5:] == ["dataset", "model"] * 2


def test_parallel_plan_counts_with_the_config_as_given(tmp_path):
    job = counting_job(tmp_path, params={"n": 9})
    assert count_items_without_building(job) == plan_job(job).n_items == 4, "params do not reach build_dataset"


# ------------------------------------------------------------- systems provider
def test_systems_provider_is_its_own_environment_provider():
    assert issubclass(InferenceProvider, EnvironmentProvider)
    assert not issubclass(InferenceProvider, ParallelInferenceProvider)
    assert InferenceProvider is not ParallelInferenceProvider


def test_systems_provider_merges_params_into_the_given_config_in_place(tmp_path):
    config, params = OmegaConf.create(systems_config(tmp_path)), {"device": "cpu", "beam": 3}
    for provider in (InferenceProvider(config, params), InferenceProvider(inference_config=config, params=params)):
        assert provider.config is config and provider.params is params
        assert config.device == "cpu" and config.beam == 3
    plain = {"n": 1}
    assert InferenceProvider(plain, {"x": 1}).config is plain and plain == {"n": 1, "x": 1}
    assert InferenceProvider().config == {} and InferenceProvider().params == {}
    assert builds(tmp_path) == [], "constructing builds nothing"


def test_systems_build_env_local_builds_afresh_on_every_call(tmp_path):
    provider = InferenceProvider(systems_config(tmp_path), params={"device": "cpu", "beam": 3})
    first = provider.build_env_local()
    provider.params["beam"] = 4
    second = provider.build_env_local()
    assert set(first) == {"dataset", "model", "device", "beam"} and (first["beam"], second["beam"]) == (3, 4)
    assert first["model"] is not second["model"] and first["dataset"] is not second["dataset"]
    assert builds(tmp_path) == ["organizer", "model:cpu"] * 2


def test_systems_worker_setup_fn_does_not_capture_the_provider(tmp_path):
    provider = InferenceProvider(systems_config(tmp_path), params={"token": "v1"})
    setup = provider.build_worker_setup_fn()
    provider.params["token"] = "v2"
    assert all(cell.cell_contents is not provider for cell in setup.__closure__)
    first, second = setup(), setup()
    assert first["token"] == second["token"] == "v1" and first["model"] is not second["model"]


def test_systems_build_dataset_returns_the_named_test_set(tmp_path):
    assert len(InferenceProvider.build_dataset(systems_config(tmp_path, "a"))) == 2, "a plain dict is accepted"
    assert InferenceProvider.build_dataset(OmegaConf.create(systems_config(tmp_path, "b")))[2]["word"] == "w2"


def test_systems_build_dataset_names_a_missing_or_unknown_test_set(tmp_path):
    with pytest.raises(KeyError) as unknown:
        InferenceProvider.build_dataset(systems_config(tmp_path, "c"))
    assert str(unknown.value) == "test_set 'c' is not a test set of config.dataset (it has ['a', 'b'])"
    config = systems_config(tmp_path)
    del config["test_set"]
    with pytest.raises(AttributeError) as missing:
        InferenceProvider.build_dataset(config)
    assert str(missing.value) == "InferenceProvider.build_dataset(config): config has no 'test_set' (it has ['dataset', 'model'])"
    with pytest.raises(AttributeError, match="config has no 'model'"):
        InferenceProvider.build_model({"dataset": {}})


def test_systems_build_model_instantiates_on_the_resolved_device(tmp_path):
    model = InferenceProvider.build_model(systems_config(tmp_path, suffix="!", vocab="v.txt"))
    assert isinstance(model, fx.ToyModel) and model.device == "cpu" and model(word="ab") == "AB!"
    assert model.vocab == "v.txt", "without recipe_dir the model is built where the process is"
    assert InferenceProvider.build_model({**systems_config(tmp_path), "device": "meta"}).device == "meta"


def test_systems_recipe_dir_build_happens_inside_it_without_making_it_importable(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "v.txt").write_text("a b\n")
    (recipe / "recipe_only_module.py").write_text("")
    monkeypatch.setattr(sys, "path", ["", *sys.path])  # "" would make the working directory importable
    cwd, path = os.getcwd(), list(sys.path)
    config = {**systems_config(tmp_path, vocab="v.txt", probe_module="recipe_only_module"), "recipe_dir": str(recipe)}
    model = InferenceProvider.build_model(config)
    assert model.built_in == str(recipe) and model.probe_imported is False
    assert model.vocab == str(recipe / "v.txt"), "an existing relative file path is bound while inside recipe_dir"
    assert os.getcwd() == cwd and sys.path == path


@pytest.fixture
def cuda(monkeypatch):
    """torch.cuda faked available with 2 visible GPUs; no LOCAL_RANK."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return monkeypatch


def test_resolve_device_follows_espnet3s_order(cuda):
    resolve = InferenceProvider._resolve_device
    assert resolve({}) == "cuda:0", "the first GPU this process sees (a shard sees its own only)"
    assert resolve({"device": "cuda:7"}) == "cuda:7"
    assert resolve({"device_index": 1, "local_rank": 0}) == "cuda:1"
    assert resolve({"local_rank": 1}) == "cuda:1"
    cuda.setenv("LOCAL_RANK", "1")
    assert resolve({}) == "cuda:1" and resolve({"local_rank": 0}) == "cuda:0"
    with pytest.raises(RuntimeError) as bad:
        resolve({"device_index": 2})
    assert str(bad.value) == ("Invalid CUDA device index 2 for the current process (device_index); "
                              "visible GPU count is 2.")
    with pytest.raises(ValueError, match="local_rank 'x' is not a CUDA device index"):
        resolve({"local_rank": "x"})


def test_resolve_device_is_cpu_without_cuda_or_torch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert InferenceProvider._resolve_device({"device_index": 5}) == "cpu"
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    assert InferenceProvider._resolve_device({}) == "cpu"


def test_systems_subclass_overriding_only_build_dataset_builds_config_model(tmp_path):
    config = {"n": 3, "log_dir": str(tmp_path), "model": {"_target_": "toys.ToyModel", "suffix": "?"}}
    env = fx.WordsSystemsProvider(config, params={"device": "cpu"}).build_env_local()
    assert len(env["dataset"]) == 3 and env["model"](word="a") == "A?" and env["model"].device == "cpu"


def test_systems_plan_counts_with_params_merged_and_builds_no_model(tmp_path):
    job = counting_job(tmp_path, provider=SYSTEMS, provider_config=systems_config(tmp_path, "a"),
                       params={"test_set": "b"})
    assert count_items_without_building(job) == plan_job(job).n_items == 3, "params.test_set reached build_dataset"
    assert builds(tmp_path) == ["organizer", "organizer"]


def test_declared_env_keys_of_both_providers(tmp_path):
    for provider in (SYSTEMS, "toys.CountingInferenceProvider"):
        job = counting_job(tmp_path, provider=provider, params={"device": "cpu"})
        assert declared_env_keys(job, build_provider(job).__class__) == ["dataset", "device", "model", "output_dir"]


def test_systems_provider_named_directly_runs_through_the_python_api(tmp_path):
    config = systems_config(tmp_path, suffix="!")
    provider = InferenceProvider(inference_config=OmegaConf.create(config), params={"device": "cpu"})
    runner = fx.CollectRunner(provider, output_dir=tmp_path / "out", n_shards=2)
    assert runner.job_spec().provider_config == config, "the job records the config as given, before the merge"
    assert [(r["utt_id"], r["score"]) for r in runner(range(3))] == [(f"utt00{i}", 3.0) for i in range(3)]
    assert builds(tmp_path) == ["organizer", "model:cpu"], "runner(indices) builds the env once"


def test_systems_provider_named_directly_plans_and_runs_under_snakemake(wf):
    config = systems_config(wf.path, suffix="!")
    wf.write_config({"sys": {"runner": "toys.MyTextRunner", "provider": SYSTEMS, "provider_config": config,
                             "params": {"device": "cpu"}, "output_dir": "results", "shard_subdir": "sys",
                             "n_shards": 2}})
    wf.snakemake("--cores", "2")
    assert (wf.path / "results" / "sys" / "text").read_text() == "".join(f"utt00{i} W{i}!\n" for i in range(3))
    assert builds(wf.path).count("model:cpu") == 2, "only the two shard processes build a model"
