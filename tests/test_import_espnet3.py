"""``python -m espnet3_rules import-espnet3``: a recipe-shaped inference/metrics YAML (tests/espnet3_recipe)
as a workflow config whose jobs are those ``infer`` runs, that ``snakemake -n`` accepts, with the same outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from espnet3_rules.cli.config import jobs_of
from espnet3_rules.cli.import_espnet3 import convert, load_espnet3_yaml
from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.systems.base.inference_jobs import inference_jobs
from workflow_driver import cli, job_counts

CONF = Path(__file__).resolve().parent / "espnet3_recipe" / "conf"
INFERENCE_YAML = CONF / "inference.yaml"
METRICS_YAML = CONF / "metrics.yaml"


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_converted_jobs_are_the_ones_infer_runs():
    (name, entry), = convert(INFERENCE_YAML, METRICS_YAML)["jobs"].items()
    ours = jobs_of(name, entry)
    mapped = inference_jobs(load_espnet3_yaml(INFERENCE_YAML))
    assert [job.root for job in ours] == [job.root for job in mapped] == [Path("exp/toy/inference", n) for n in ("dev", "test")]
    for job, reference in zip(ours, mapped):
        assert job.result_fields() == reference.result_fields()
        assert (job.n_shards, job.resources, job.test_set) == (reference.n_shards, reference.resources, reference.test_set)
    assert entry["measure"] == {"metrics": [{"metric": "espnet3_rules.systems.esp2_asr.metrics.wer.WER", "inputs": {"ref": "dataset:text", "hyp": "hyp"}}]}


def test_metrics_target_and_kwargs_and_list_inputs(tmp_path):
    metrics = write_yaml(tmp_path / "metrics.yaml", {"metrics": [
        {"metric": {"_target_": "espnet3.systems.esp2_asr.metrics.wer.WER", "clean_types": None}, "inputs": ["hyp"]},
    ]})  # fmt: skip
    (entry,) = convert(INFERENCE_YAML, metrics)["jobs"].values()
    assert entry["measure"]["metrics"] == [
        {"metric": "espnet3_rules.systems.esp2_asr.metrics.wer.WER", "kwargs": {"clean_types": None}, "inputs": {"hyp": "hyp"}}
    ]


@pytest.mark.parametrize(
    "metrics, words",
    [
        ({"metrics": [{"metric": {"_target_": "a.B"}, "input": {"hyp": "hyp"}}]}, "metrics[0] has unknown key(s) ['input']"),
        ({"metrics": [{"metric": {"_target_": "a.B"}}], "scorer": 1}, "unknown key(s) ['scorer']"),
        ({"metrics": []}, "metrics must be a non-empty list"),
        ({"metrics": [{"metric": {"_target_": "a.B"}}], "inference_dir": "elsewhere"},
         "inference_dir 'elsewhere' is not the inference config's './exp/toy/inference'"),
        ({"metrics": [{"metric": {"_target_": "a.B"}}], "dataset": {"test": [{"name": "dev"}]}},
         "dataset.test names ['dev'] are not the inference config's ['dev', 'test']"),
    ],
)
def test_metrics_keys_it_does_not_know_are_named(tmp_path, metrics, words):
    with pytest.raises(ContractError) as info:
        convert(INFERENCE_YAML, write_yaml(tmp_path / "metrics.yaml", metrics))
    assert words in str(info.value)


def test_defaults_list_is_refused_in_one_line(tmp_path):
    text = INFERENCE_YAML.read_text(encoding="utf-8").replace("  - _self_", "  - model: conformer\n  - _self_")
    (tmp_path / "inference.yaml").write_text(text, encoding="utf-8")
    proc = cli("import-espnet3", tmp_path / "inference.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"espnet3_rules import-espnet3: error: {tmp_path / 'inference.yaml'}: defaults [")
    assert "is a Hydra defaults list, which import-espnet3 does not compose" in proc.stderr


@pytest.fixture
def switched_pythonpath(tmp_path, monkeypatch):
    """``rules_stages`` (tests/espnet3_user/stages.py, imports switched) importable here and in subprocesses."""
    from espnet3_user import switched_on_path

    directory = tmp_path / "switched"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(directory), os.environ.get("PYTHONPATH", "")]))
    with switched_on_path(directory, {"stages": "rules_stages"}):
        yield directory


def test_converted_recipe_runs_under_snakemake_as_infer_runs_it(wf, switched_pythonpath, tmp_path, monkeypatch):
    """The printed config passes ``snakemake -n``; its run writes the same ``<test>/<field>.scp`` files
    (bytes; artifact paths relative to the same root) as ``infer`` on the original config."""
    from omegaconf import OmegaConf

    from espnet3_rules.parallel import parallel
    from espnet3_rules.systems.base.inference import infer

    proc = cli("import-espnet3", INFERENCE_YAML, METRICS_YAML, cwd=wf.path)
    assert proc.returncode == 0, proc.stderr
    (wf.path / "config.yaml").write_text(proc.stdout, encoding="utf-8")
    _, out = wf.snakemake("-n")
    assert job_counts(out)["shard"] == 4, out
    wf.snakemake("--cores", "2")

    recipe = tmp_path / "recipe"
    shutil.copytree(CONF, recipe / "conf")
    monkeypatch.chdir(recipe)
    monkeypatch.setattr(parallel, "parallel_config", None)
    infer(OmegaConf.create(load_espnet3_yaml("conf/inference.yaml")))
    for test in ("dev", "test"):
        ours, ref = wf.path / "exp/toy/inference" / test, recipe / "exp/toy/inference" / test
        names = sorted(p.name for p in ref.glob("*.scp"))
        assert names == sorted(p.name for p in ours.glob("*.scp")) == ["hyp.scp", "n_chars.scp", "n_words.scp", "score.scp", "vec.scp"]
        for name in names:  # artifact paths: the same below each run's own directory
            ours_text = (ours / name).read_text(encoding="utf-8").replace(str(wf.path.resolve()), "ROOT")
            assert ours_text == (ref / name).read_text(encoding="utf-8").replace(str(recipe.resolve()), "ROOT"), name
    assert "WER" in (wf.path / "exp/toy/inference/metrics.json").read_text(encoding="utf-8")
