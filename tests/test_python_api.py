"""Python API: ``runner(indices)`` returns merge's value and shares the CLI's engine and layout."""

from __future__ import annotations

import json

import core_fixtures as fx
from espnet3_rules.engine.plan import read_manifest


def words_provider(tmp_path, n):
    """WordsProvider whose forward calls (ProbeTextRunner) are logged to ``tmp_path/calls``."""
    return fx.WordsProvider({"n": n, "extra_env": {"calls_file": str(tmp_path / "calls")}})


def config_for(tmp_path, n, n_shards):
    """The same job as ``ProbeTextRunner(words_provider(...))``, as a YAML config."""
    return fx.write_config(tmp_path / "c.yaml", runner="core_fixtures.ProbeTextRunner",
                           provider="core_fixtures.WordsProvider", output_dir=str(tmp_path / "out"),
                           shard_subdir="test", n_shards=n_shards,
                           provider_config={"n": n, "extra_env": {"calls_file": str(tmp_path / "calls")}})


def test_runner_returns_merge_value_with_shards_in_id_order(tmp_path):
    runner = fx.ShardOrderRunner(fx.WordsProvider({"n": 12}), output_dir=tmp_path, n_shards=12)
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

    status = fx.cli("status", "--manifest", root / "manifest.json")
    assert "3 done, pending: none" in status.stdout
    (root / "text").unlink()
    fx.cli("merge", "--manifest", root / "manifest.json")
    assert (root / "text").read_bytes() == python_text

    manifest = (root / "manifest.json").read_text()
    fx.cli("plan", "--config", config_for(tmp_path, 7, 3), "--job", "j")
    assert json.loads((root / "manifest.json").read_text())["fingerprint"] == json.loads(manifest)["fingerprint"], \
        "the plan step of the same job leaves the Python API's shards valid"
    assert fx.cli("status", "--config", tmp_path / "c.yaml", "--job", "j").returncode == 0


def test_shards_run_by_the_cli_are_resumed_by_the_python_api(tmp_path):
    config = config_for(tmp_path, 8, 3)
    fx.cli("plan", "--config", config, "--job", "j")
    for shard in range(3):
        fx.cli("run-shard", "--config", config, "--job", "j", "--shard", shard)
    assert sorted(fx.read_lines(tmp_path / "calls"), key=int) == [str(i) for i in range(8)]
    (tmp_path / "calls").unlink()

    runner = fx.ProbeTextRunner(words_provider(tmp_path, 8), output_dir=tmp_path / "out", shard_subdir="test",
                                n_shards=3)
    assert runner(range(8)) == {}
    assert fx.read_lines(tmp_path / "calls") == [], "every shard the CLI ran counts as done"
    assert (tmp_path / "out" / "test" / "text").read_text() == fx.expected_text(range(8))
