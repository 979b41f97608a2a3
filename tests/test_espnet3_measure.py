"""Differential: ESPnet3 202611's ``measure`` and ours on the same inference directory and user classes.

The user module ``tests/espnet3_user/metrics.py`` (a metric with ``sum``/``cat`` states and an
artifact, a provider whose ``build_dataset`` gives the references) is run as written under ESPnet3,
and from the copy with only its import lines switched under espnet3-rules, next to ESPnet3's own
WER/CER and ours. Every file either side writes must be the same, bytes included, once the class
paths (``espnet3.`` / ``espnet3_rules.``, the user module's two names) are read as one; ours also
stamps each exported dataset column (``dataset/<column>.source.json``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from espnet3_wheel import espnet3_root  # noqa: F401  (session fixture)

pytest.importorskip("jiwer")

USER = "espnet3_user.metrics"
RULES_USER = "rules_metrics"  # the same source, import lines switched
SIDES = {"espnet3": ("espnet3", USER), "rules": ("espnet3_rules", RULES_USER)}
OURS_ONLY = "dataset/text.source.json"


@pytest.fixture
def sides(espnet3_root, tmp_path):  # noqa: F811
    """``{side: (measure function, package, user module name)}`` with the switched user module importable."""
    from espnet3_user import switched_on_path

    with switched_on_path(tmp_path / "switched", {"metrics": RULES_USER}):
        yield {
            side: (importlib.import_module(f"{package}.systems.base.metric").measure, package, user)
            for side, (package, user) in SIDES.items()
        }


def configs(package: str, user: str, inference_dir: Path, **extra):
    from omegaconf import OmegaConf

    both = {"ref": "dataset:text", "hyp": "hyp"}
    metrics = [
        {"metric": {"_target_": f"{package}.systems.esp2_asr.metrics.wer.WER"}, "inputs": both},
        {"metric": {"_target_": f"{package}.systems.esp2_asr.metrics.cer.CER", "clean_types": None}, "inputs": both},
        {"metric": {"_target_": f"{user}.LengthRatio", "precision": 2}, "inputs": both},
    ]
    metrics_config = OmegaConf.create({"inference_dir": str(inference_dir), "metrics": metrics, **extra})
    inference_config = OmegaConf.create({"provider": {"_target_": f"{user}.TranscriptProvider"}})
    return metrics_config, inference_config


def as_espnet3(text: str) -> str:
    """Our class paths read as ESPnet3's."""
    return text.replace(f"{RULES_USER}.", f"{USER}.").replace("espnet3_rules.", "espnet3.")


def written(root: Path):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_measure_writes_what_espnet3_writes(sides, tmp_path):
    outcome = {}
    for side, (measure, package, user) in sides.items():
        inference_dir = tmp_path / side
        importlib.import_module(user).write_inference_dir(inference_dir)
        first = measure(*configs(package, user, inference_dir))
        again = measure(*configs(package, user, inference_dir, dataset={"test": [{"name": "eval"}]}))
        outcome[side] = (first, again, written(inference_dir))
    (ref_first, ref_again, ref_files), (first, again, files) = outcome["espnet3"], outcome["rules"]
    assert {as_espnet3(k): v for k, v in first.items()} == ref_first
    assert {as_espnet3(k): v for k, v in again.items()} == ref_again
    assert ref_first[f"{USER}.LengthRatio"]["dev"] == {"ratio": 0.75, "utts": 3}
    stamps = sorted(p for p in files if p.endswith(OURS_ONLY))
    assert stamps == [f"{test}/{OURS_ONLY}" for test in ("dev", "eval")]
    files = {p: data for p, data in files.items() if p not in stamps}
    assert sorted(files) == sorted(ref_files)
    assert {"dev/wer_alignment", "eval/cer_alignment", "dev/length_ratio.txt", "eval/dataset/text.scp"} <= set(files)
    for path, data in ref_files.items():
        assert as_espnet3(files[path].decode("utf-8")) == data.decode("utf-8"), path


@pytest.mark.parametrize(
    "metric, inputs, error, words",
    [
        ("pathlib.PurePosixPath", None, TypeError, "not a valid BaseMetric instance"),
        ("{package}.systems.esp2_asr.metrics.wer.WER", {"hyp": "hyp"}, ValueError, "inputs: missing ['ref']"),
        ("{package}.systems.esp2_asr.metrics.wer.WER", None, ValueError, "declares inputs; bind them"),
    ],
)
def test_measure_refuses_what_espnet3_refuses(sides, tmp_path, metric, inputs, error, words):
    messages = {}
    for side, (measure, package, user) in sides.items():
        inference_dir = tmp_path / side
        importlib.import_module(user).write_inference_dir(inference_dir)
        entry = {"metric": {"_target_": metric.format(package=package, user=user)}, "inputs": inputs}
        metrics_config, inference_config = configs(package, user, inference_dir, metrics=[entry])
        with pytest.raises(error) as info:
            measure(metrics_config, inference_config)
        messages[side] = str(info.value)
        assert not (inference_dir / "metrics.json").exists()
    assert all(words in message for message in messages.values()), messages


def test_contract_metrics_exports_espnet3s_names(espnet3_root):  # noqa: F811
    theirs = importlib.import_module("espnet3.contract.metrics")
    ours = importlib.import_module("espnet3_rules.contract.metrics")
    assert sorted(ours.__all__) == sorted(theirs.__all__)
