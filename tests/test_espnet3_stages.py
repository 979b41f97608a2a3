"""Differential test of the inference stage: ESPnet3 202611's ``infer(config)`` and ours on the same
ESPnet3-shaped config (two test sets, ``batch_size``, an array field with ``output_artifacts``), over the
same user classes (tests/espnet3_user/stages.py, and its copy with the import lines switched).

ESPnet3 runs in-process (its ``set_parallel`` patched out, as in test_espnet3_reference.py: with it, a
one-worker local Dask cluster runs the same shard); ours runs as ``infer`` runs, with the config's
``parallel:`` (2 workers), so the shard subprocesses import the switched module from ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from espnet3_wheel import espnet3_root  # noqa: F401  (session fixture)

TESTS = Path(__file__).resolve().parent
N_ITEMS = 11
TEST_SETS = ("dev", "eval")
SCALAR_FIELDS = ("hyp", "n_chars", "n_words", "score")


def stage_config(inference_dir: Path, module: str) -> dict:
    """The inference config, its user classes taken from ``module``."""
    return {
        "inference_dir": str(inference_dir),
        "dataset": {
            "_target_": f"{module}.StageOrganizer",
            "n_items": N_ITEMS,
            "test": [{"name": name, "seed": seed} for seed, name in enumerate(TEST_SETS, 1)],
        },
        "scale": 1.5,
        "input_key": ["text", "number"],
        "output_fn": "espnet3_user.data.format_output",
        "batch_size": 4,
        "output_artifacts": {"vec": {"type": "npy"}},
        "parallel": {"env": "local", "n_workers": 2},
        "provider": {"_target_": f"{module}.StageProvider"},
        "runner": {"_target_": f"{module}.StageRunner", "tag": "t"},
    }


@pytest.fixture
def switched_pythonpath(espnet3_root, tmp_path, monkeypatch):  # noqa: F811
    """``rules_stages`` (the switched copy) importable here and in shard subprocesses (with ``espnet3_user``)."""
    from espnet3_user import switched_on_path

    directory = tmp_path / "switched"
    paths = [str(directory), str(TESTS), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    with switched_on_path(directory, {"stages": "rules_stages"}):
        yield directory


def test_infer_writes_what_espnet3_infer_writes(switched_pythonpath, tmp_path, monkeypatch):
    import numpy as np
    from omegaconf import OmegaConf

    import espnet3.systems.base.inference as espnet3_inference
    from espnet3_rules.parallel import parallel
    from espnet3_rules.systems.base.inference import infer

    monkeypatch.setattr(espnet3_inference, "set_parallel", lambda config: None)
    espnet3_inference.infer(OmegaConf.create(stage_config(tmp_path / "espnet3", "espnet3_user.stages")))
    monkeypatch.setattr(parallel, "parallel_config", None)
    infer(OmegaConf.create(stage_config(tmp_path / "ours", "rules_stages")))

    for test in TEST_SETS:
        ours, ref = tmp_path / "ours" / test, tmp_path / "espnet3" / test
        names = sorted(p.name for p in ref.glob("*.scp"))
        assert names == sorted(p.name for p in ours.glob("*.scp")) == sorted(f"{f}.scp" for f in (*SCALAR_FIELDS, "vec"))
        for field in SCALAR_FIELDS:
            assert (ours / f"{field}.scp").read_bytes() == (ref / f"{field}.scp").read_bytes(), (test, field)
        ours_vec = [line.split(" ", 1) for line in (ours / "vec.scp").read_text(encoding="utf-8").splitlines()]
        ref_vec = [line.split(" ", 1) for line in (ref / "vec.scp").read_text(encoding="utf-8").splitlines()]
        assert [u for u, _ in ours_vec] == [u for u, _ in ref_vec] and len(ref_vec) == N_ITEMS
        for (utt, path), (_, ref_path) in zip(ours_vec, ref_vec):
            path, ref_path = Path(path), Path(ref_path)
            # below each root: split.<rank>/vec/<utt>.npy (ESPnet3 runs one shard, ours two)
            assert path.parent.parent.parent == ours and path.parent.name == "vec" and path.name == f"{utt}.npy"
            assert ref_path.relative_to(ref).parts[1:] == path.relative_to(ours).parts[1:]
            np.testing.assert_array_equal(np.load(path), np.load(ref_path))
    assert {p.parent.name for p in (tmp_path / "ours" / "dev").glob("split.*/done")} == {"split.0", "split.1"}
