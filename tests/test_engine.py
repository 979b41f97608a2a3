"""Core engine: ESPnet3 contracts, plan, shard run, merge, staleness, CLI (issue 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import engine_toy as toy
from espnet3_rules import ContractError, concatenate_shard_files
from espnet3_rules.cli.config import Unit, plan_unit
from espnet3_rules.engine.merge import completed_shard_dirs, pending_shards
from espnet3_rules.engine.plan import decode_items, encode_items, make_plan, read_manifest, split_contiguous, write_manifest
from espnet3_rules.engine.shard import build_worker_env, run_shard

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    proc = subprocess.run([sys.executable, "-m", "espnet3_rules", *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def text_runner(tmp_path, n=10, n_shards=3, cls=toy.TextRunner, provider=toy.ListProvider, **kw):
    config = {"n": n, **kw.pop("config", {})}
    return cls(provider(config), output_dir=tmp_path / "out", n_shards=n_shards, **kw)


def expected_text(n):
    return "".join(f"utt{i} W{i}\n" for i in range(n))


# ----------------------------------------------------------------- plan
def test_split_is_contiguous_and_balanced_like_espnet3():
    assert split_contiguous(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(c) for c in split_contiguous(list(range(7)), 7)] == [1] * 7


@pytest.mark.parametrize(
    "items",
    [list(range(5, 12)), [[0, 1, 2], [3, 4, 5], [6]], ["a", "b"], [3, 1, 2], [[0, 1], [2]], [[0], [1, 2]]],
)
def test_items_encoding_round_trips(items):
    assert decode_items(json.loads(json.dumps(encode_items(items)))) == items


def test_manifest_holds_version_shards_and_fingerprint(tmp_path):
    runner = text_runner(tmp_path, n=10, n_shards=3, batch_size=2)
    plan = runner.plan(range(10))
    manifest = json.loads(write_manifest(plan).read_text())
    assert manifest["version"] == 1 and manifest["n_shards"] == 3 and manifest["n_items"] == 10
    assert manifest["spec"]["runner"] == "engine_toy.TextRunner" and manifest["spec"]["batch_size"] == 2
    assert manifest["shards"][0]["items"] == {"range": [0, 4], "batch_size": 2}
    assert read_manifest(plan.manifest_path).shards == plan.shards == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9]]]


@pytest.mark.parametrize(
    "change",
    [
        {"batch_size": 2},
        {"n_shards": 2},
        {"config": {"kill_at": 99}},
        {"cls": toy.StateCloseRunner},
        {"provider": toy.CountingProvider, "config": {"calls_file": "x"}},
    ],
)
def test_fingerprint_follows_what_determines_results(tmp_path, change):
    base = text_runner(tmp_path).plan(range(10))
    assert text_runner(tmp_path).plan(range(10)).fingerprint == base.fingerprint
    assert text_runner(tmp_path, **change).plan(range(10)).fingerprint != base.fingerprint
    assert text_runner(tmp_path).plan(range(9)).fingerprint != base.fingerprint


def test_inference_provider_params_change_the_fingerprint(tmp_path):
    def plan(params):
        provider = toy.TinyInferenceProvider({"n": 4}, params=params)
        return toy.CollectRunner(provider, output_dir=tmp_path).plan(range(4)).fingerprint

    assert plan({"beam": 1}) == plan({"beam": 1}) != plan({"beam": 2})


# ------------------------------------------------------------ contracts
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: text_runner(p, cls=toy.SelfRunner), "SelfRunner.forward must be a @staticmethod"),
        (lambda p: text_runner(p, batch_size=0), "batch_size must be a positive integer or null, got 0"),
        (lambda p: text_runner(p, n_shards=0), "n_shards must be an integer >= 1, got 0"),
        (lambda p: text_runner(p, n_shards=11), r"n_shards \(11\) exceeds the number of items \(10\)"),
        (lambda p: toy.TextRunner(toy.ListProvider({"n": 3})), "TextRunner needs output_dir"),
        (
            lambda p: toy.NeedsDevice(toy.TinyInferenceProvider({"n": 10}), output_dir=p),
            r"NeedsDevice.forward needs 'device' but TinyInferenceProvider's env provides \['dataset', 'model', "
            r"'output_dir', 'shard_subdir'\]",
        ),
    ],
)
def test_common_mistakes_fail_at_plan_time(tmp_path, make, message):
    with pytest.raises(ContractError, match=message):
        make(tmp_path).plan(range(10))
    assert not (tmp_path / "out" / "split.0").exists(), "nothing may run before the plan is valid"


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ContractError, match="the dataset is empty"):
        text_runner(tmp_path).plan([])


def test_setup_fn_returning_a_dict_is_caught_by_the_plan_step(tmp_path):
    unit = Unit(job="j", runner="engine_toy.TextRunner", provider="engine_toy.DictSetupProvider",
                output_dir=str(tmp_path), provider_config={"n": 3})
    with pytest.raises(ContractError, match=r"DictSetupProvider.build_worker_setup_fn\(\) returned a dict .*setup function"):
        plan_unit(unit)


def test_env_name_mismatch_names_missing_and_available_keys(tmp_path):
    runner = toy.TextRunner(toy.RenamedProvider({}), output_dir=tmp_path)
    with pytest.raises(ContractError, match=r"needs 'dataset', 'model' but RenamedProvider's env provides \['ds', 'net'"):
        runner(range(1))
    assert not (tmp_path / "split.0" / "done").exists()


@pytest.mark.parametrize(
    "path, message",
    [
        ("engine_toy.Nope", "module 'engine_toy' has no attribute 'Nope'"),
        ("no_such_pkg.Runner", "no module 'no_such_pkg' can be imported"),
        ("Runner", "is not an import path"),
    ],
)
def test_unresolvable_import_paths(tmp_path, path, message):
    unit = Unit(job="j", runner=path, provider="engine_toy.ListProvider", output_dir=str(tmp_path), provider_config={"n": 3})
    with pytest.raises(ContractError, match=message):
        plan_unit(unit)


# ------------------------------------------------------------ python API
def test_text_runner_python_api_writes_shards_and_merges(tmp_path):
    runner = text_runner(tmp_path, n=10, n_shards=3)
    assert runner(range(10)) == {}
    out = tmp_path / "out"
    assert (out / "text").read_text() == expected_text(10)
    assert (out / "split.1" / "text").read_text() == expected_text(7)[len(expected_text(4)):]
    done = json.loads((out / "split.2" / "done").read_text())
    assert done["fingerprint"] == json.loads((out / "manifest.json").read_text())["fingerprint"]


def test_state_accumulating_runner_merges_records_in_order(tmp_path):
    runner = text_runner(tmp_path, n=7, n_shards=3, cls=toy.CollectRunner)
    assert runner(range(7)) == [{"idx": i, "word": f"W{i}"} for i in range(7)]


def test_batch_aware_forward_gets_lists(tmp_path):
    runner = text_runner(tmp_path, n=5, n_shards=2, cls=toy.BatchRunner, batch_size=2)
    assert runner(range(5)) == [["W0", "W1"], ["W2", "W3"], ["W4"]]


def test_env_injected_by_name_without_var_kwargs(tmp_path):
    assert text_runner(tmp_path, n=3, n_shards=1, cls=toy.ExplicitRunner)(range(3)) == ["W0", "W1", "W2"]


def test_close_writers_with_state_and_env(tmp_path):
    runner = text_runner(tmp_path, n=4, n_shards=2, cls=toy.StateCloseRunner)
    runner(range(4))
    assert runner.deserialize_state(tmp_path / "out" / "split.1")["closed_items"] == 1


def test_resume_skips_matching_done_and_reruns_stale(tmp_path):
    calls = tmp_path / "calls"
    config = {"calls_file": str(calls)}

    def run(**kw):
        calls.write_text("")
        runner = text_runner(tmp_path, n=6, n_shards=3, cls=toy.CountingRunner, provider=toy.CountingProvider,
                             config=config, **kw)
        runner(range(6))
        return calls.read_text().split()

    assert run() == ["0", "1", "2", "3", "4", "5"]
    (tmp_path / "out" / "split.1" / "done").unlink()
    assert run() == ["2", "3"]
    assert run(resume=False) == ["0", "1", "2", "3", "4", "5"]
    assert run(batch_size=1) == ["[0]", "[1]", "[2]", "[3]", "[4]", "[5]"], "a new plan reruns every shard"


def test_merge_refuses_missing_and_stale_shards(tmp_path):
    text_runner(tmp_path, n=6, n_shards=3)(range(6))
    old = text_runner(tmp_path, n=6, n_shards=3).plan(range(6))
    (old.shard_dir(0) / "done").unlink()
    new = text_runner(tmp_path, n=6, n_shards=3, batch_size=2).plan(range(6))
    assert pending_shards(new) == [0, 1, 2]
    with pytest.raises(ContractError, match=r"shards not done: split.0; run those shards first"):
        completed_shard_dirs(old)
    with pytest.raises(ContractError, match=r"not done: split.0; stale \(done from another plan\): split.1, split.2"):
        completed_shard_dirs(new)


def test_concatenate_shard_files_keeps_order_and_skips_missing(tmp_path):
    dirs = [tmp_path / f"split.{i}" for i in range(3)]
    for i, d in enumerate(dirs):
        d.mkdir()
        if i != 1:
            (d / "x.scp").write_text(f"u{i} v\n")
    assert concatenate_shard_files(dirs, "x.scp", tmp_path / "x.scp")
    assert (tmp_path / "x.scp").read_text() == "u0 v\nu2 v\n"
    assert not concatenate_shard_files(dirs, "y.scp", tmp_path / "y.scp")
    assert not (tmp_path / "y.scp").exists()


# ------------------------------------------------- shard processes, CLI
def write_config(tmp_path, **provider_config):
    config = {"jobs": {"j": {"runner": "engine_toy.TextRunner", "provider": "engine_toy.ListProvider",
                             "provider_config": {"n": 9, **provider_config}, "output_dir": str(tmp_path / "out"),
                             "n_shards": 3}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_killed_shard_leaves_no_done_and_rerun_is_byte_identical(tmp_path):
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    cli("plan", "--config", str(write_config(clean_dir)), "--job", "j")
    cli("run-shard", "--manifest", str(clean_dir / "out/manifest.json"), "--shard", "1")

    config = write_config(tmp_path, kill_at=4)  # item 4 is the second item of shard 1 (items 3..5)
    cli("plan", "--config", str(config), "--job", "j")
    manifest = str(tmp_path / "out/manifest.json")
    killed = cli("run-shard", "--manifest", manifest, "--shard", "1", check=False)
    assert killed.returncode == -9
    shard = tmp_path / "out" / "split.1"
    assert not (shard / "done").exists()
    assert (shard / "text").exists(), "the shard died mid-write"

    # Same plan, minus the kill: rewrite the manifest's config key and rerun (the CLI reads the manifest).
    data = json.loads(Path(manifest).read_text())
    data["spec"]["provider_config"]["kill_at"] = None
    Path(manifest).write_text(json.dumps(data))
    cli("run-shard", "--manifest", manifest, "--shard", "1")
    assert (shard / "text").read_bytes() == (clean_dir / "out/split.1/text").read_bytes()
    assert json.loads((shard / "done").read_text())["fingerprint"] == data["fingerprint"]


def test_cli_plan_run_merge_status_and_one_line_errors(tmp_path):
    config = str(write_config(tmp_path))
    assert "3 shards x 3 items (9 items" in cli("plan", "--config", config, "--job", "j").stdout
    status = cli("status", "--config", config, "--job", "j", check=False)
    assert status.returncode == 3 and "pending: [0, 1, 2]" in status.stdout
    merge = cli("merge", "--config", config, "--job", "j", check=False)
    assert merge.returncode == 2
    assert merge.stderr.strip().splitlines() == [
        f"espnet3_rules merge: error: cannot merge {tmp_path}/out: shards not done: split.0, split.1, split.2; "
        "run those shards first"
    ]
    for shard in range(3):
        cli("run-shard", "--config", config, "--job", "j", "--shard", str(shard))
    cli("merge", "--config", config, "--job", "j")
    assert (tmp_path / "out" / "text").read_text() == "".join(f"utt{i} W{i}\n" for i in range(9))
    assert cli("status", "--config", config, "--job", "j").returncode == 0
    bad = cli("run-shard", "--config", config, "--job", "j", "--shard", "7", check=False)
    assert bad.returncode == 2 and "shard 7 does not exist; the plan has shards 0..2" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_worker_env_is_built_by_the_setup_function(tmp_path):
    runner = text_runner(tmp_path, n=3, n_shards=1)
    plan = runner.plan(range(3))
    run_shard(runner, plan, 0, build_worker_env(runner))
    assert (plan.shard_dir(0) / "text").read_text() == expected_text(3)


def test_package_imports_and_runs_without_torch(tmp_path):
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'numpy', 'jiwer'):\n"
        "            raise ImportError(f'{name} blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    code = (
        "import sys, engine_toy\n"
        f"r = engine_toy.TextRunner(engine_toy.ListProvider({{'n': 4}}), output_dir={str(tmp_path / 'o')!r}, n_shards=2)\n"
        "r(range(4))\n"
        "assert 'torch' not in sys.modules\n"
        "print(open(r.output_dir / 'text').read(), end='')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(TESTS), str(REPO)]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_text(4)


def test_shard_resources_default_and_grow_per_attempt():
    unit = Unit(job="j", runner="r.R", provider="p.P", output_dir="o",
                resources={"mem_mb": 1000, "runtime": 10, "attempt_scale": 2, "slurm_partition": "gpu"})
    assert [unit.shard_resource("mem_mb", attempt) for attempt in (1, 2, 3)] == [1000, 2000, 4000]
    assert unit.shard_resource("runtime", 2) == 20
    assert unit.shard_resource("threads", 3) == 1 and unit.shard_resource("slurm_partition") == "gpu"
    assert unit.shard_group() is None
    assert Unit(job="j", runner="r.R", provider="p.P", output_dir="o", resources={"group": "g"}).shard_group() == "g"
