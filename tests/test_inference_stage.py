"""``infer(config)`` and :func:`inference_jobs`, its mapping of an ESPnet3 inference config onto jobs:
the config errors of ESPnet3 202611's ``infer``, and the job ``infer`` records equals the mapped one."""

from __future__ import annotations

import pytest

from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.systems.base.inference_jobs import inference_jobs

N_ITEMS = 7


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """``rules_stages``: tests/espnet3_user/stages.py with its imports switched, importable meanwhile."""
    from espnet3_user import switched_on_path

    with switched_on_path(tmp_path_factory.mktemp("stages"), {"stages": "rules_stages"}) as directory:
        yield directory


@pytest.fixture
def no_parallel(monkeypatch):
    """No parallel config before the test, none left after it (infer sets one)."""
    from espnet3_rules.parallel import parallel

    monkeypatch.setattr(parallel, "parallel_config", None)


def stage_config(tmp_path, **changes):
    """An ESPnet3-shaped inference config over the ``rules_stages`` classes, with ``changes`` (None deletes)."""
    config = {
        "inference_dir": str(tmp_path / "inference"),
        "dataset": {
            "_target_": "rules_stages.StageOrganizer",
            "n_items": N_ITEMS,
            "test": [{"name": "a", "seed": 1}, {"name": "b", "seed": 2}],
        },
        "scale": 2.0,
        "input_key": ["text", "number"],
        "output_fn": "espnet3_user.data.format_output",
        "batch_size": 3,
        "output_artifacts": {"vec": {"type": "npy"}},
        "provider": {"_target_": "rules_stages.StageProvider", "params": {"device": "cpu"}},
        "runner": {"_target_": "rules_stages.StageRunner", "tag": "x"},
        "parallel": {"env": "local", "n_workers": 2, "options": {"memory_limit": "1GB"}},
    }
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    return config


def test_one_job_per_test_set_with_what_infer_passes(tmp_path):
    jobs = inference_jobs(stage_config(tmp_path))
    assert [(job.test_set, job.root) for job in jobs] == [(n, tmp_path / "inference" / n) for n in ("a", "b")]
    job = jobs[1]
    assert (job.provider, job.runner, job.n_shards, job.batch_size) == (
        "rules_stages.StageProvider", "rules_stages.StageRunner", 2, 3)  # fmt: skip
    assert job.params == {
        "device": "cpu", "input_key": ["text", "number"], "idx_key": "utt_id", "output_keys": None,
        "output_fn_path": "espnet3_user.data.format_output", "output_artifacts": {"vec": {"type": "npy"}},
    }  # fmt: skip
    assert job.runner_kwargs == {"idx_key": "utt_id", "hyp_key": [], "ref_key": [], "tag": "x"}
    assert job.provider_config["test_set"] == "b" and "parallel" not in job.provider_config
    assert job.resources == {"mem_mb": 954}


def test_espnet3_targets_are_switched(tmp_path):
    config = stage_config(tmp_path, runner={"_target_": "espnet3.systems.base.inference_runner.InferenceRunner"})
    job = inference_jobs(config)[0]
    assert job.runner == "espnet3_rules.systems.base.inference_runner.InferenceRunner"
    assert job.provider_config["runner"]["_target_"] == job.runner


def test_the_job_infer_records_is_the_mapped_one(tmp_path, stages, no_parallel):
    """The provider and runner infer builds through Hydra record (``runner.job_spec()``) the mapped job."""
    from espnet3_rules.parallel.parallel import set_parallel
    from espnet3_rules.systems.base.inference import build_provider, build_runner

    config = stage_config(tmp_path)
    set_parallel(config["parallel"])
    for job in inference_jobs(config):
        runner = build_runner(job, build_provider(job))
        assert runner.tag == "x"
        recorded = runner.job_spec()
        assert recorded.root == job.root and recorded.result_fields() == job.result_fields()
        assert (recorded.n_shards, recorded.provider) == (job.n_shards, job.provider)


@pytest.mark.parametrize(
    "changes, error, words",
    [
        ({"dataset": {"test": [{"seed": 1}]}}, RuntimeError, "must define non-empty `name` (failed at index 0)"),
        ({"dataset": {"test": []}}, AssertionError, "No test set found in dataset"),
        ({"dataset": {"test": [{"name": "a"}, {"name": "a"}]}}, AssertionError, "Duplicate test key found"),
        ({"dataset": {}}, AttributeError, "dataset.test must be a list"),
        ({"inference_dir": None}, AttributeError, "inference_dir must be set"),
        ({"input_key": None}, RuntimeError, "inference_config.input_key must be set."),
        ({"input_key": []}, RuntimeError, "inference_config.input_key must not be empty."),
        ({"output_keys": []}, RuntimeError, "inference_config.output_keys must not be empty."),
        ({"provider": None}, RuntimeError, "inference_config.provider must be set."),
        ({"runner": None}, RuntimeError, "inference_config.runner must be set."),
        ({"contract": {"inputs": {"text": {"kind": "text"}}, "outputs": {"hyp": {"kind": "text"}}}},
         ValueError, "output_fn cannot be combined with an inference contract"),
        ({"output_fn": "espnet3_user.data.no_such_fn"}, ValueError, "has no attribute 'no_such_fn'"),
        ({"provider": {"_target_": "rules_stages.StageProvider", "scale": 3}}, ValueError,
         "inference_config.provider has key(s) ['scale'] that a job cannot record; allowed: _target_, params"),
        ({"runner": {"_target_": "rules_stages.StageRunner", "_partial_": True}}, ValueError,
         "inference_config.runner has key(s) ['_partial_']"),
        ({"runner": {"_target_": "rules_stages.StageRunner", "batch_size": 8}}, ValueError,
         "inference_config.runner sets ['batch_size'], which infer() passes itself"),
        ({"parallel": {"env": "local", "n_worker": 2}}, ValueError, "parallel has unknown key(s) ['n_worker']"),
        ({"parallel": {"env": "local", "n_workers": 0}}, ValueError, "n_workers must be a positive integer"),
        ({"scale": "${no_such_key}"}, ValueError, "InterpolationKeyError"),
    ],
    ids=lambda value: None if not isinstance(value, str) else value[:30],
)
def test_config_errors_are_espnet3s(tmp_path, changes, error, words):
    with pytest.raises(error) as info:
        inference_jobs(stage_config(tmp_path, **changes))
    assert isinstance(info.value, ContractError) and words in str(info.value)


def test_infer_refuses_an_empty_test_set(tmp_path, stages, no_parallel):
    from espnet3_rules.systems.base.inference import infer

    config = stage_config(tmp_path)
    config["dataset"]["n_items"] = 0
    with pytest.raises(RuntimeError, match="Test dataset 'a' is empty"):
        infer(config)
