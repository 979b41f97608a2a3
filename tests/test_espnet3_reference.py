"""Differential tests against the real ESPnet3 (the ``espnet`` wheel from PyPI, see ``espnet3_wheel.py``).

Each test runs the same user code (``tests/espnet3_user``) over the same items twice:
once under ESPnet3 itself, in-process (``runner(list(range(n)))`` with no parallel
config: ESPnet3 runs its shards locally), and once through espnet3-rules (the
Snakemake workflow with ``--cores 2`` over several shards, or the Python API), and
compares the merged outputs byte for byte (array artifacts: by their arrays, as
their paths name each run's own shard directories). The espnet3-rules variant of
the user code is made mechanically from the same source file, with only its import
lines switched (``espnet3_user.write_switched``).

The tests are skipped when the wheel cannot be downloaded (no network), unless ``CI`` is set.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from espnet3_wheel import espnet3_root  # noqa: F401  (session fixture)
from workflow_driver import job_counts

N_ITEMS = 23
N_SHARDS = 4
WORDS = "espnet3_user.words"  # the ESPnet3 user code, unchanged
RULES_WORDS = "rules_words"  # the same source, import lines switched (written by the switched_dir fixture)
RULES_INFERENCE = "rules_inference"
ESPNET3_INFERENCE_RUNNER = "espnet3.systems.base.inference_runner.InferenceRunner"
RULES_INFERENCE_RUNNER = "espnet3_rules.systems.base.inference_runner.InferenceRunner"
TOY_PROVIDER = "espnet3_user.inference.ToyInferenceProvider"  # an ESPnet3 InferenceProvider subclass
#: The scalar fields of the inference toy (byte-compared); ``vec`` is an array field written as artifacts.
SCALAR_FIELDS = ("hyp", "n_words", "score")


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="session")
def switched_dir(espnet3_root, tmp_path_factory):  # noqa: F811
    """A directory holding ``rules_words.py`` / ``rules_inference.py``: the user modules, imports switched."""
    from espnet3_user import switched_on_path

    copies = {"words": RULES_WORDS, "inference": RULES_INFERENCE}
    with switched_on_path(tmp_path_factory.mktemp("switched_user"), copies) as directory:
        yield directory


@pytest.fixture
def shard_pythonpath(espnet3_root, switched_dir, monkeypatch):  # noqa: F811
    """Snakemake and its shard processes import the unpacked ESPnet3 and the switched modules."""
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(espnet3_root), str(switched_dir), *old]))


def no_parallel_config():
    """ESPnet3 runs locally (one process, its own shard plan) only while no parallel config is set."""
    from espnet3.parallel.parallel import get_parallel_config

    assert get_parallel_config() is None, "a parallel config is set: ESPnet3 would not run in-process"


def base_modules(module):
    """The modules defining the classes ``module``'s WordsRunner and WordsProvider derive from."""
    user = importlib.import_module(module)
    return {c.__module__ for c in user.WordsRunner.__mro__[1:] + user.WordsProvider.__mro__[1:]} - {"abc", "builtins"}


def words_config(n_items=N_ITEMS, **extra):
    return {"n_items": n_items, **extra}


def run_words_in_process(module, out_dir, provider_config, batch_size=None, shard_subdir="", **runner_kwargs):
    """Run ``module``'s WordsProvider/WordsRunner in-process; merge's return value."""
    from omegaconf import OmegaConf

    user = importlib.import_module(module)
    provider = user.WordsProvider(OmegaConf.create(provider_config))
    runner = user.WordsRunner(provider, batch_size=batch_size, output_dir=out_dir, shard_subdir=shard_subdir,
                              **runner_kwargs)  # fmt: skip
    return runner(list(range(int(provider_config["n_items"]))))


def espnet3_words(out_dir, provider_config, batch_size=None, suffix=""):
    """ESPnet3's merged ``hyp<suffix>.scp`` bytes (and merge's return) for the WordsRunner job."""
    no_parallel_config()
    result = run_words_in_process(WORDS, out_dir, provider_config, batch_size, "ref", suffix=suffix)
    return (Path(out_dir) / "ref" / f"hyp{suffix}.scp").read_bytes(), result


def words_job(module, name, provider_config, batch_size=None, n_shards=N_SHARDS, **runner_kwargs):
    entry = {
        "runner": f"{module}.WordsRunner",
        "provider": f"{module}.WordsProvider",
        "provider_config": provider_config,
        "output_dir": "results",
        "shard_subdir": name,
        "n_shards": n_shards,
        "batch_size": batch_size,
    }
    if runner_kwargs:
        entry["runner_kwargs"] = runner_kwargs
    return entry


def inference_params():
    from espnet3_user.inference import inference_params as params

    return params()


def inference_provider_config():
    return {"n_items": N_ITEMS, "seed": 3, "scale": 2.5}


#: What ESPnet3's ``infer()`` handed the provider, per call of :func:`recording_provider`.
INFER_PARAMS = []


def recording_provider(inference_config, params=None):
    """``provider._target_`` of the reference run: the user's own factory, with ``params`` recorded."""
    from espnet3_user.inference import from_inference_config

    INFER_PARAMS.append(params)
    return from_inference_config(inference_config, params=params)


def espnet3_inference(out_dir, batch_size):
    """ESPnet3's own ``infer()`` entrypoint over the inference toy, in-process (no parallel config set).

    ``infer()`` builds the provider's params (``input_key``, ``idx_key``, ``output_keys``,
    ``output_fn_path``, ``output_artifacts``) and constructs ``InferenceRunner(provider,
    idx_key=, hyp_key=[], ref_key=[], batch_size=, output_dir=<inference_dir>/<test>)``; the
    params it passed are checked to be the ones our config gives (:func:`inference_params`).
    Returns the test set's output directory.
    """
    from omegaconf import OmegaConf

    from espnet3.systems.base.inference import infer
    from espnet3_user.inference import OUTPUT_FN

    params = inference_params()
    config = OmegaConf.create({
        **inference_provider_config(),
        "inference_dir": str(out_dir),
        "dataset": {"test": [{"name": "test"}]},
        "input_key": params["input_key"],
        "idx_key": params["idx_key"],
        "output_fn": OUTPUT_FN,
        "batch_size": batch_size,
        "provider": {"_target_": f"{__name__}.recording_provider"},
        "runner": {"_target_": ESPNET3_INFERENCE_RUNNER},
    })  # fmt: skip
    INFER_PARAMS.clear()
    no_parallel_config()
    with pytest.MonkeyPatch.context() as mp:
        # infer() sets a parallel config when it has none (a 1-worker local Dask cluster, which
        # runs the same _run_one_shard over the same single shard); without it ESPnet3 runs that
        # shard in-process, and no Dask is needed.
        mp.setattr("espnet3.systems.base.inference.set_parallel", lambda config: None)
        infer(config)
    no_parallel_config()
    assert INFER_PARAMS == [params], "the params in our config must be those ESPnet3's infer() passes"
    return Path(out_dir) / "test"


def inference_job(runner, provider, name, batch_size):
    params = inference_params()
    return {
        "runner": runner,
        "provider": provider,
        "provider_config": inference_provider_config(),
        "params": params,
        "runner_kwargs": {"idx_key": params["idx_key"], "hyp_key": [], "ref_key": []},
        "output_dir": "results",
        "shard_subdir": name,
        "n_shards": N_SHARDS,
        "batch_size": batch_size,
    }


def assert_same_inference_outputs(ours: Path, ref: Path, workdir: Path):
    """Same merged ``<field>.scp`` files; scalar ones byte-identical; the artifact field: same ids and arrays.

    Artifact paths are where each run's shards wrote them: ours under ``ours/split.N/vec/``
    (relative to Snakemake's ``workdir`` when the configured ``output_dir`` is, as ESPnet3 writes
    them relative to a relative ``output_dir``).
    """
    import numpy as np

    assert sorted(p.name for p in ours.glob("*.scp")) == sorted(p.name for p in ref.glob("*.scp")) == sorted(
        f"{f}.scp" for f in (*SCALAR_FIELDS, "vec")
    )
    for field in SCALAR_FIELDS:
        assert (ours / f"{field}.scp").read_bytes() == (ref / f"{field}.scp").read_bytes(), field
    ours_vec = [line.split(" ", 1) for line in (ours / "vec.scp").read_text(encoding="utf-8").splitlines()]
    ref_vec = [line.split(" ", 1) for line in (ref / "vec.scp").read_text(encoding="utf-8").splitlines()]
    assert [u for u, _ in ours_vec] == [u for u, _ in ref_vec] and len(ref_vec) == N_ITEMS
    for (utt, path), (_, ref_path) in zip(ours_vec, ref_vec):
        path = workdir / path  # as is when absolute
        split = path.parent.parent
        assert split.parent == ours and split.name.startswith("split.") and path.parent.name == "vec", path
        assert path.name == f"{utt}.npy", path
        np.testing.assert_array_equal(np.load(path), np.load(ref_path))


def done_mtimes(root: Path):
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.glob("*/split.*/done"))}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("module", [WORDS, RULES_WORDS], ids=["espnet3-classes", "switched-imports"])
def test_words_runner_under_snakemake_matches_espnet3_in_process(module, wf, shard_pythonpath, tmp_path):
    """The user classes named in our config (ESPnet3's own, or the import-switched copy), run by
    ``snakemake --cores 2`` over 4 shards: merged outputs byte-identical to ESPnet3's in-process run."""
    expected_bases = {
        WORDS: {"espnet3.parallel.base_runner", "espnet3.parallel.env_provider"},
        RULES_WORDS: {"espnet3_rules.parallel.base_runner", "espnet3_rules.parallel.env_provider"},
    }[module]
    assert base_modules(module) == expected_bases
    configs = {
        "batched": (words_config(joiner="_"), 3),
        "single": (words_config(seed=5), None),
    }
    wf.write_config({name: words_job(module, name, cfg, batch) for name, (cfg, batch) in configs.items()})
    _, out = wf.snakemake("--cores", "2")
    assert job_counts(out)["shard"] == 2 * N_SHARDS
    for name, (cfg, batch) in configs.items():
        ref, _ = espnet3_words(tmp_path / f"espnet3-{name}", cfg, batch)
        root = wf.path / "results" / name
        assert sorted(p.name for p in root.glob("split.*")) == [f"split.{i}" for i in range(N_SHARDS)]
        assert (root / "hyp.scp").read_bytes() == ref, name
        assert ref.count(b"\n") == N_ITEMS


@pytest.mark.parametrize("batch_size", [None, 4])
def test_switched_imports_python_api_matches_espnet3(batch_size, switched_dir, tmp_path):
    """The import-switched copy run through our Python API (``runner(indices)``, in-process): the same
    merged bytes and the same ``merge`` return value as ESPnet3."""
    from espnet3_rules.parallel.base_runner import BaseRunner as RulesBaseRunner

    assert issubclass(importlib.import_module(RULES_WORDS).WordsRunner, RulesBaseRunner)
    assert not any(m.split(".")[0] == "espnet3" for m in base_modules(RULES_WORDS))
    cfg = words_config(joiner="+")
    ref, ref_result = espnet3_words(tmp_path / "espnet3", cfg, batch_size, suffix=".api")
    result = run_words_in_process(RULES_WORDS, tmp_path / "ours", cfg, batch_size, "ref", suffix=".api")
    assert (tmp_path / "ours" / "ref" / "hyp.api.scp").read_bytes() == ref
    assert result == ref_result


def test_espnet3_inference_runner_under_snakemake_matches_espnet3(wf, shard_pythonpath, tmp_path):
    """ESPnet3's own InferenceRunner with an ESPnet3 InferenceProvider subclass, named in our config with
    the params/runner arguments ESPnet3's ``infer()`` gives them, sharded under Snakemake: the merged
    ``<field>.scp`` files equal ESPnet3's in-process output (artifact paths point into our shards)."""
    wf.write_config({
        "batched": inference_job(ESPNET3_INFERENCE_RUNNER, TOY_PROVIDER, "batched", 5),
        "single": inference_job(ESPNET3_INFERENCE_RUNNER, TOY_PROVIDER, "single", None),
    })
    wf.snakemake("--cores", "2")
    for name, batch in (("batched", 5), ("single", None)):
        ref = espnet3_inference(tmp_path / f"espnet3-{name}", batch)
        assert_same_inference_outputs(wf.path / "results" / name, ref, wf.path)


def test_switched_inference_provider_with_our_inference_runner_matches_espnet3(wf, shard_pythonpath, tmp_path):
    """The import-switched InferenceProvider subclass with our InferenceRunner (the ``espnet3_rules`` twin of
    ESPnet3's), given the runner arguments ``infer()`` passes (``hyp_key=[]``, ``ref_key=[]``), under
    Snakemake: the same merged ``<field>.scp`` files as ESPnet3's InferenceRunner in-process."""
    wf.write_config({"t": inference_job(RULES_INFERENCE_RUNNER, f"{RULES_INFERENCE}.ToyInferenceProvider", "t", 5)})
    wf.snakemake("--cores", "2")
    assert_same_inference_outputs(wf.path / "results" / "t", espnet3_inference(tmp_path / "espnet3", 5), wf.path)


def test_runner_option_reaches_merge_and_change_reruns_only_that_job(wf, shard_pythonpath, tmp_path):
    """A custom runner constructor option (``runner_kwargs: {suffix: ...}``) of ESPnet3 user classes reaches
    ``merge`` in the Snakemake run; changing it reruns exactly that job's shards and merge, not the other job's."""
    cfg = words_config(joiner="~")
    jobs = {
        "a": words_job(WORDS, "a", cfg, 2, suffix=".v1"),
        "b": words_job(WORDS, "b", cfg, 2, suffix=".v1"),
    }
    wf.write_config(jobs)
    wf.snakemake("--cores", "2")
    results = wf.path / "results"
    ref_v1, _ = espnet3_words(tmp_path / "espnet3-v1", cfg, 2, suffix=".v1")
    for name in jobs:
        assert (results / name / "hyp.v1.scp").read_bytes() == ref_v1
        assert not (results / name / "hyp.scp").exists()
    before = done_mtimes(results)
    assert len(before) == 2 * N_SHARDS

    jobs["a"]["runner_kwargs"]["suffix"] = ".v2"
    wf.write_config(jobs)
    _, out = wf.snakemake("--cores", "2")
    counts = job_counts(out)
    assert counts["shard"] == N_SHARDS and counts["merge"] == 1, counts
    after = done_mtimes(results)
    rewritten = sorted(k for k in after if after[k] != before.get(k))
    assert rewritten == [f"a/split.{i}/done" for i in range(N_SHARDS)]
    ref_v2, _ = espnet3_words(tmp_path / "espnet3-v2", cfg, 2, suffix=".v2")
    assert (results / "a" / "hyp.v2.scp").read_bytes() == ref_v2
    assert (results / "b" / "hyp.v1.scp").read_bytes() == ref_v1
    assert not (results / "b" / "hyp.v2.scp").exists()


@pytest.mark.parametrize("ci", [False, True], ids=["local-skips", "ci-fails"])
def test_unavailable_wheel_skips_locally_and_fails_under_ci(ci, tmp_path):
    """When the wheel cannot be downloaded (here: pip without an index, empty cache), the tests using
    ``espnet3_root`` are skipped with the reason, except under ``CI``, where they fail."""
    import subprocess

    tests_dir = Path(__file__).resolve().parent
    cache = tmp_path / "empty-cache"
    (tmp_path / "conftest.py").write_text(
        "import espnet3_wheel\n"
        f"espnet3_wheel.CACHE_DIR = __import__('pathlib').Path({str(cache)!r})\n"
        "from espnet3_wheel import espnet3_root\n",
        encoding="utf-8",
    )
    (tmp_path / "test_uses_espnet3.py").write_text("def test_it(espnet3_root):\n    pass\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "CI"}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "no-wheels"), PIP_CONFIG_FILE=os.devnull,
               PYTHONPATH=os.pathsep.join([str(tests_dir), env.get("PYTHONPATH", "")]))  # fmt: skip
    if ci:
        env["CI"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    if ci:
        assert proc.returncode == 1 and "1 error" in out, out
        assert "CI is set" in out and "cannot download espnet==" in out, out
    else:
        assert proc.returncode == 0 and "1 skipped" in out, out
        assert "reference ESPnet3 unavailable: cannot download espnet==" in out, out
    assert not (cache / "espnet-202611").exists()
