"""ESPnet3's "common mistakes" (and other bad jobs) fail at plan time with one clear line."""

from __future__ import annotations

import re

import pytest

import core_fixtures as fx
from espnet3_rules import ContractError
from espnet3_rules.cli.config import Unit, plan_unit


def unit(tmp_path, **fields):
    """A valid job (CollectRunner over 5 words, 2 shards) with ``fields`` changed."""
    base = dict(job="j", runner="core_fixtures.CollectRunner", provider="core_fixtures.WordsProvider",
                output_dir=str(tmp_path / "out"), n_shards=2, provider_config={"n": 5})
    base.update(fields)
    return Unit(**base)


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
        dict(runner="core_fixtures.SelfRunner"),
        r"^SelfRunner\.forward must be a @staticmethod \(it is a function\); .*must not take or capture self$",
    ),
    "setup fn returning the env": (
        dict(provider="core_fixtures.DictSetupProvider"),
        r"^DictSetupProvider\.build_worker_setup_fn\(\) returned a dict \(the env itself\); "
        r"it must return a zero-argument setup function",
    ),
    "setup fn taking arguments": (
        dict(provider="core_fixtures.ArgSetupProvider"),
        r"^ArgSetupProvider\.build_worker_setup_fn\(\) returned a function that needs arguments \['config'\]",
    ),
    "provider without worker setup": (
        dict(provider="core_fixtures.LocalOnlyProvider"),
        r"^LocalOnlyProvider must implement build_worker_setup_fn\(\)",
    ),
    "mismatched env names": (
        dict(runner="core_fixtures.MyTextRunner", provider="core_fixtures.DeclaredRenamedProvider"),
        r"^MyTextRunner\.forward needs 'dataset', 'model' but DeclaredRenamedProvider's env provides "
        r"\['ds', 'net', 'output_dir', 'shard_subdir'\]; rename",
    ),
    "mismatched env names of a plain provider": (
        dict(runner="core_fixtures.MyTextRunner", provider="core_fixtures.RenamedProvider"),
        r"^jobs\.j: RenamedProvider's env has no 'dataset' \(it has \['ds', 'net'\]\); "
        r"name the dataset 'dataset' or set items: N in the config$",
    ),
    "dataset without len": (
        dict(provider="core_fixtures.IterProvider"),
        r"^jobs\.j: the dataset \(list_iterator\) has no len\(\); set items: N in the config$",
    ),
    "env name no param gives": (
        dict(runner="core_fixtures.NeedsDeviceRunner", provider="core_fixtures.CountingInferenceProvider"),
        r"^NeedsDeviceRunner\.forward needs 'device' but CountingInferenceProvider's env provides "
        r"\['dataset', 'model', 'output_dir', 'shard_subdir'\]",
    ),
    "runner module missing": (
        dict(runner="no_such_module_xyz.Runner"),
        r"^jobs\.j\.runner 'no_such_module_xyz\.Runner': no module 'no_such_module_xyz' can be imported$",
    ),
    "runner attribute missing": (
        dict(runner="core_fixtures.NoSuchRunner"),
        r"^jobs\.j\.runner 'core_fixtures\.NoSuchRunner': module 'core_fixtures' has no attribute 'NoSuchRunner'$",
    ),
    "provider nested attribute missing": (
        dict(provider="core_fixtures.sub.Provider"),
        r"^jobs\.j\.provider 'core_fixtures\.sub\.Provider': module 'core_fixtures' has no attribute 'sub\.Provider'$",
    ),
    "not an import path": (
        dict(runner="CollectRunner"),
        r"^jobs\.j\.runner 'CollectRunner' is not an import path like 'package\.module\.Name'$",
    ),
    "runner is not a class": (
        dict(runner="core_fixtures.shout"),
        r"^jobs\.j\.runner 'core_fixtures\.shout' is not a BaseRunner class$",
    ),
    "provider is not a class": (
        dict(provider="core_fixtures.words_env"),
        r"^jobs\.j\.provider 'core_fixtures\.words_env' is not an EnvironmentProvider class",
    ),
    "runner kwargs that do not fit": (
        dict(runner_kwargs={"beam": 3}),
        r"^jobs\.j\.runner_kwargs do not fit CollectRunner: .*'beam'",
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
        r"^jobs\.j: CollectRunner needs output_dir: shards write split\.N/ under it$",
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
    refuse(lambda: plan_unit(unit(tmp_path, **fields)), message)
    assert list(tmp_path.iterdir()) == [], "a refused plan writes nothing"


def test_the_fixed_jobs_plan(tmp_path):
    assert plan_unit(unit(tmp_path)).n_shards == 2
    assert plan_unit(unit(tmp_path, provider="core_fixtures.IterProvider", items=3)).n_items == 3
    fixed = unit(tmp_path, runner="core_fixtures.NeedsDeviceRunner", provider="core_fixtures.CountingInferenceProvider",
                 params={"device": "cpu"})
    assert plan_unit(fixed).spec["params"] == {"device": "cpu"}


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
    refuse(lambda: plan_unit(unit(tmp_path, runner="brokenrunners.Runner")), message)


def test_missing_dependency_whose_name_prefixes_the_module_is_named(tmp_path, monkeypatch):
    (tmp_path / "depx_runners.py").write_text("import depx\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    refuse(lambda: plan_unit(unit(tmp_path, runner="depx_runners.Runner")),
           r"importing 'depx_runners' failed: No module named 'depx'$")


# ------------------------------------------------------------ Python API
def words_runner(tmp_path, cls=fx.CollectRunner, provider=None, **kwargs):
    kwargs.setdefault("output_dir", tmp_path / "out")
    return cls(provider or fx.WordsProvider({"n": 5}), **kwargs)


API_MISTAKES = {
    "forward capturing self": (dict(cls=fx.SelfRunner), r"^SelfRunner\.forward must be a @staticmethod"),
    "mismatched env names": (
        dict(cls=fx.MyTextRunner, provider=fx.DeclaredRenamedProvider({"n": 5})),
        r"^MyTextRunner\.forward needs 'dataset', 'model' but DeclaredRenamedProvider's env provides \['ds', 'net'",
    ),
    "batch_size zero": (dict(batch_size=0), r"^batch_size must be a positive integer or null, got 0$"),
    "n_shards zero": (dict(n_shards=0), r"^n_shards must be an integer >= 1, got 0$"),
    "more shards than items": (dict(n_shards=6), r"^n_shards \(6\) exceeds the number of items \(5\)"),
    "no output_dir": (dict(output_dir=None), r"^CollectRunner needs output_dir: shards write split\.N/ under it$"),
    "empty output_dir": (dict(output_dir=""), r"^CollectRunner needs output_dir: shards write split\.N/ under it$"),
}


@pytest.mark.parametrize("kwargs, message", API_MISTAKES.values(), ids=API_MISTAKES.keys())
def test_runner_call_refuses_before_running_anything(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    runner = words_runner(tmp_path, **kwargs)
    refuse(lambda: runner(range(5)), message)
    assert list(tmp_path.iterdir()) == []


def test_runner_call_refuses_an_empty_index_list(tmp_path):
    refuse(lambda: words_runner(tmp_path)([]), r"^the dataset is empty: nothing to shard$")
    assert not (tmp_path / "out").exists()
