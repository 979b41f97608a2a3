"""ESPnet3's "common mistakes" (and other bad jobs) fail at plan time with one clear line."""

from __future__ import annotations

import re

import pytest

import toys as fx
from espnet3_rules import ContractError
from espnet3_rules.cli.config import describe_job
from espnet3_rules.engine.job import JobSpec
from espnet3_rules.engine.plan import plan_job


def job(tmp_path, **fields):
    """A valid job (CollectRunner over 5 words, 2 shards) with ``fields`` changed."""
    base = dict(name="j", runner="toys.CollectRunner", provider="toys.SampleProvider",
                output_dir=str(tmp_path / "out"), n_shards=2, provider_config={"n": 5})
    base.update(fields)
    return JobSpec(**base)


def refuse(make_plan, message):
    """``make_plan()`` raises a one-line ContractError matching ``message``."""
    with pytest.raises(ContractError) as info:
        make_plan()
    text = str(info.value)
    assert "\n" not in text
    assert re.search(message, text), text
    return text


MISTAKES = {
    "forward capturing self": (
        dict(runner="toys.SelfRunner"),
        r"^SelfRunner\.forward must be a @staticmethod or @classmethod \(it is a function\); "
        r"shards call it without an instance, so it must not take or capture self$",
    ),
    "setup fn returning the env": (
        dict(provider="toys.DictSetupProvider"),
        r"^DictSetupProvider\.build_worker_setup_fn\(\) returned a dict \(the env itself\); "
        r"it must return a zero-argument setup function",
    ),
    "setup fn taking arguments": (
        dict(provider="toys.ArgSetupProvider"),
        r"^ArgSetupProvider\.build_worker_setup_fn\(\) returned a function that needs arguments \['config'\]",
    ),
    "provider without worker setup": (
        dict(provider="toys.LocalOnlyProvider"),
        r"^LocalOnlyProvider must implement build_worker_setup_fn\(\)",
    ),
    "mismatched env names": (
        dict(runner="toys.MyTextRunner", provider="toys.DeclaredRenamedProvider"),
        r"^MyTextRunner\.forward needs 'dataset', 'model' but DeclaredRenamedProvider's env provides "
        r"\['ds', 'net', 'output_dir'\]; rename",
    ),
    "mismatched env names of a plain provider": (
        dict(runner="toys.MyTextRunner", provider="toys.RenamedProvider"),
        r"^jobs\.j: RenamedProvider's env has no 'dataset' \(it has \['ds', 'net'\]\); "
        r"name the dataset 'dataset' or set items: N in the config$",
    ),
    "dataset without len": (
        dict(provider="toys.IterProvider"),
        r"^jobs\.j: the dataset \(list_iterator, from IterProvider\.build_env_local\) has no len\(\); "
        r"set items: N in the config$",
    ),
    "env name no param gives": (
        dict(runner="toys.NeedsDeviceRunner", provider="toys.CountingInferenceProvider"),
        r"^NeedsDeviceRunner\.forward needs 'device' but CountingInferenceProvider's env provides "
        r"\['dataset', 'model', 'output_dir'\]",
    ),
    "runner module missing": (
        dict(runner="no_such_module_xyz.Runner"),
        r"^jobs\.j\.runner 'no_such_module_xyz\.Runner': no module 'no_such_module_xyz' can be imported$",
    ),
    "runner attribute missing": (
        dict(runner="toys.NoSuchRunner"),
        r"^jobs\.j\.runner 'toys\.NoSuchRunner': module 'toys' has no attribute 'NoSuchRunner'$",
    ),
    "provider nested attribute missing": (
        dict(provider="toys.sub.Provider"),
        r"^jobs\.j\.provider 'toys\.sub\.Provider': module 'toys' has no attribute 'sub\.Provider'$",
    ),
    "not an import path": (
        dict(runner="CollectRunner"),
        r"^jobs\.j\.runner 'CollectRunner' is not an import path like 'package\.module\.Name'$",
    ),
    "runner is not a class": (
        dict(runner="toys.shout"),
        r"^jobs\.j\.runner 'toys\.shout' is not a BaseRunner class \(no forward\)$",
    ),
    "provider is not a class": (
        dict(provider="toys.words_env"),
        r"^jobs\.j\.provider 'toys\.words_env' is not an EnvironmentProvider class",
    ),
    "params the provider does not take": (
        dict(params={"beam": 3}),
        r"^jobs\.j\.params given, but SampleProvider\.__init__ takes no params argument$",
    ),
    "batch_size zero": (dict(batch_size=0), r"^jobs\.j: batch_size must be a positive integer or null, got 0$"),
    "batch_size negative": (dict(batch_size=-2), r"^jobs\.j: batch_size must be a positive integer or null, got -2$"),
    "batch_size not an int": (
        dict(batch_size="2"),
        r"^jobs\.j: batch_size must be a positive integer or null, got '2'$",
    ),
    "n_shards zero": (dict(n_shards=0), r"^jobs\.j: n_shards must be an integer >= 1, got 0$"),
    "n_shards negative": (dict(n_shards=-1), r"^jobs\.j: n_shards must be an integer >= 1, got -1$"),
    "output_dir empty": (
        dict(output_dir=""),
        r"^jobs\.j: output_dir is required: shards write split\.N/ under it$",
    ),
    "empty dataset": (dict(provider_config={"n": 0}), r"^jobs\.j: the dataset is empty: nothing to shard$"),
    "more shards than items": (
        dict(n_shards=6),
        r"^jobs\.j: n_shards \(6\) exceeds the number of items \(5\); lower n_shards$",
    ),
    "more shards than batches": (
        dict(n_shards=4, batch_size=2),
        r"^jobs\.j: n_shards \(4\) exceeds the number of batches \(3\); lower n_shards$",
    ),
}


@pytest.mark.parametrize("fields, message", MISTAKES.values(), ids=MISTAKES.keys())
def test_plan_step_refuses_with_one_line(tmp_path, monkeypatch, fields, message):
    monkeypatch.chdir(tmp_path)
    refuse(lambda: plan_job(job(tmp_path, **fields)), message)
    assert list(tmp_path.iterdir()) == [], "a refused plan writes nothing"


def test_the_fixed_jobs_plan(tmp_path):
    assert plan_job(job(tmp_path)).n_shards == 2
    assert plan_job(job(tmp_path, provider="toys.IterProvider", items=3)).n_items == 3
    fixed = job(tmp_path, runner="toys.NeedsDeviceRunner", provider="toys.CountingInferenceProvider",
                 params={"device": "cpu"})
    assert plan_job(fixed).job.params == {"device": "cpu"}
    assert plan_job(job(tmp_path, runner="toys.ClassForwardRunner")).n_items == 5, "a @classmethod forward is fine"
    assert plan_job(job(tmp_path, runner="toys.BeamRunner", runner_kwargs={"beam": 3})).job.runner_kwargs == {"beam": 3}


@pytest.mark.parametrize(
    "check",
    [
        pytest.param(plan_job, id="plan rule"),
        pytest.param(describe_job, id="dry-run"),
    ],
)
def test_runner_kwargs_the_constructor_does_not_take(tmp_path, monkeypatch, check):
    monkeypatch.chdir(tmp_path)
    refuse(lambda: check(job(tmp_path, runner_kwargs={"beam": 3})),
           r"^jobs\.j\.runner_kwargs do not fit CollectRunner: .*unexpected keyword argument 'beam'$")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "source, message",
    [
        ("import missingdep_abc\n", r"importing 'brokenrunners' failed: No module named 'missingdep_abc'$"),
        ("raise ValueError('boom')\n", r"importing 'brokenrunners' raised ValueError: boom$"),
    ],
)
def test_runner_module_that_fails_to_import_names_the_cause(tmp_path, monkeypatch, source, message):
    (tmp_path / "brokenrunners.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    refuse(lambda: plan_job(job(tmp_path, runner="brokenrunners.Runner")), message)


def test_missing_dependency_whose_name_prefixes_the_module_is_named(tmp_path, monkeypatch):
    (tmp_path / "depx_runners.py").write_text("import depx\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    refuse(lambda: plan_job(job(tmp_path, runner="depx_runners.Runner")),
           r"importing 'depx_runners' failed: No module named 'depx'$")


# ------------------------------------------------------------ Python API
def words_runner(tmp_path, cls=fx.CollectRunner, provider=None, **kwargs):
    kwargs.setdefault("output_dir", tmp_path / "out")
    return cls(provider or fx.SampleProvider({"n": 5}), **kwargs)


def plan_rule_message(tmp_path, **fields):
    """What the plan rule says about the same mistake, without the ``jobs.j: `` of a config job."""
    with pytest.raises(ContractError) as info:
        plan_job(job(tmp_path, **fields))
    return str(info.value).removeprefix("jobs.j: ")


#: Python API mistake -> (runner arguments, the same mistake as a config job): the message is the plan rule's.
API_MISTAKES = {
    "forward capturing self": (dict(cls=fx.SelfRunner), dict(runner="toys.SelfRunner")),
    "mismatched env names": (
        dict(cls=fx.MyTextRunner, provider=fx.DeclaredRenamedProvider({"n": 5})),
        dict(runner="toys.MyTextRunner", provider="toys.DeclaredRenamedProvider"),
    ),
    "batch_size zero": (dict(batch_size=0), dict(batch_size=0)),
    "n_shards zero": (dict(n_shards=0), dict(n_shards=0)),
    "more shards than items": (dict(n_shards=6), dict(n_shards=6)),
}


@pytest.mark.parametrize("kwargs, fields", API_MISTAKES.values(), ids=API_MISTAKES.keys())
def test_runner_call_refuses_as_the_plan_rule_does_before_running_anything(tmp_path, monkeypatch, kwargs, fields):
    monkeypatch.chdir(tmp_path)
    message = plan_rule_message(tmp_path, **fields)
    runner = words_runner(tmp_path, **kwargs)
    assert refuse(lambda: runner(range(5)), ".") == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output_dir", [None, ""])
def test_runner_call_needs_an_output_dir(tmp_path, monkeypatch, output_dir):
    monkeypatch.chdir(tmp_path)
    refuse(lambda: words_runner(tmp_path, output_dir=output_dir)(range(5)),
           r"^CollectRunner requires output_dir for shard execution: shards write split\.N/ under it$")
    assert list(tmp_path.iterdir()) == []


def test_runner_call_refuses_an_empty_index_list(tmp_path):
    message = plan_rule_message(tmp_path, provider_config={"n": 0})
    assert refuse(lambda: words_runner(tmp_path)([]), ".") == message
    assert not (tmp_path / "out").exists()
