"""InferenceRunner: options, output validation, artifacts, batched forward, merge."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

import toys
from espnet3_rules import ContractError, InferenceRunner
from espnet3_rules.systems.base.inference_runner import FIELD_KEYS_NAME, _WARNED_UNBATCHED

REPO = Path(__file__).resolve().parents[1]


def make_runner(tmp_path, n=5, model="EchoModel", **kwargs):
    provider = toys.SpeechProvider({"n": n, "model": model})
    kwargs.setdefault("input_key", "speech")
    return InferenceRunner(provider, output_dir=tmp_path / "out", **kwargs)


def read_scp(path):
    return [line.split(" ", 1) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def writers_for(tmp_path, output_artifacts=None):
    shard_dir = tmp_path / "split.0"
    shard_dir.mkdir(parents=True, exist_ok=True)
    return InferenceRunner.open_writers(shard_dir, output_artifacts=output_artifacts)


def scp_fields(root):
    """The merged ``<field>.scp`` names under ``root``, sorted."""
    return sorted(p.stem for p in Path(root).glob("*.scp"))


def write(writers, result, **env):
    InferenceRunner.write_record(writers, result, {}, **env)
    for handle in writers["scp_handles"].values():
        handle.flush()


# --------------------------------------------------------------- end to end
def test_sharded_run_writes_every_value_kind_and_merges_in_order(tmp_path):
    runner = make_runner(
        tmp_path,
        n=5,
        n_shards=2,
        batch_size=2,
        input_key=["speech", "text"],
        output_fn="toys.every_kind_output_fn",
        model_kwargs={"scale": 2.0},
    )
    assert runner(range(5)) is True
    root = tmp_path / "out"
    assert scp_fields(root) == ["feats", "hyp", "meta", "n"]
    assert read_scp(root / "hyp.scp") == [[f"utt{i}", f"WORD{i} TEXT"] for i in range(5)]
    assert read_scp(root / "n.scp") == [[f"utt{i}", str(4 * (i + 1))] for i in range(5)]
    items = toys.speech_dataset(5)
    for (utt_id, path), item in zip(read_scp(root / "feats.scp"), items):
        assert Path(path).is_absolute() and Path(path).suffix == ".npy"
        np.testing.assert_allclose(np.load(path), item["speech"] * 2.0)
    utt_id, meta_path = read_scp(root / "meta.scp")[4]
    assert meta_path.endswith("/split.1/meta/utt4.json")
    assert json.loads(Path(meta_path).read_text(encoding="utf-8")) == {"idx": 4, "text": "word4 text"}
    # batches [0,1] [2,3] [4] -> shards [[0,1],[2,3]] and [[4]]
    assert (root / "split.1" / FIELD_KEYS_NAME).read_text() == "feats\nhyp\nmeta\nn\n"  # sorted, as ESPnet3
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert manifest["job"]["runner_kwargs"] == {
        "input_key": ["speech", "text"],
        "output_fn": "toys.every_kind_output_fn",
        "model_kwargs": {"scale": 2.0},
    }
    assert not list(root.rglob(".*.tmp.*"))


def test_output_keys_select_the_fields_written(tmp_path):
    runner = make_runner(tmp_path, n=3, output_fn="toys.id_output_fn", output_keys=["n"])
    assert runner(range(3)) is True
    assert scp_fields(tmp_path / "out") == ["n"]  # extra keys (feats, text) are not written
    assert read_scp(tmp_path / "out" / "n.scp") == [["utt0", "4"], ["utt1", "8"], ["utt2", "12"]]


def test_plain_model_result_is_returned_as_is_with_model_kwargs():
    class Model:
        def __call__(self, speech, prefix):
            return {"utt_id": f"{prefix}{len(speech)}", "len": len(speech)}

    dataset = toys.speech_dataset(2)
    out = InferenceRunner.forward(1, dataset=dataset, model=Model(), input_key="speech", model_kwargs={"prefix": "u"})
    assert out == {"utt_id": "u8", "len": 8}


def test_nested_result_lists_are_flattened(tmp_path):
    runner = make_runner(
        tmp_path, n=4, batch_size=3, input_key=["speech", "text"], output_fn="toys.output_fn_nested"
    )
    runner(range(4))
    assert [row[0] for row in read_scp(tmp_path / "out" / "hyp.scp")] == ["utt0", "utt1", "utt2", "utt3"]


def test_missing_input_key_in_dataset_item_is_a_key_error_naming_the_index(tmp_path):
    dataset = toys.speech_dataset(3)
    del dataset[2]["speech"]
    with pytest.raises(KeyError, match=r"^Input key 'speech' not found in dataset item\. \(dataset index 2; "
                       r"dataset\[2\] has keys: \['text', 'utt_id'\]\)$"):
        InferenceRunner.forward([1, 2], dataset=dataset, model=toys.EchoModel(), input_key="speech")
    with pytest.raises(ContractError, match=r"dataset\[0\] has a str"):
        InferenceRunner.forward(0, dataset=["raw"], model=toys.EchoModel(), input_key="speech")


# --------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "result, message",
    [
        ("just text", "^Expected dict output, got str: 'just text'$"),
        ([{"utt_id": "a", "hyp": "x"}, 3], "Expected dict output, got int"),
        ({"hyp": "x"}, r"sample identifier key .*idx_key='utt_id' \(output keys: \['hyp'\]\)$"),
        ({"utt_id": ["a", "b"], "hyp": "x"}, "^'utt_id' must be a single value, not list"),
        ({"utt_id": "", "hyp": "x"}, "not a safe id"),
        ({"utt_id": ".", "hyp": "x"}, "not a safe id"),
        ({"utt_id": "..", "hyp": "x"}, "not a safe id"),
        ({"utt_id": "a b", "hyp": "x"}, "whitespace"),
        ({"utt_id": "a\tb", "hyp": "x"}, "whitespace"),
        ({"utt_id": "../a", "hyp": "x"}, "'/'"),
        ({"utt_id": "a\\b", "hyp": "x"}, "'/'"),
        ({"utt_id": 1.5, "hyp": "x"}, "str or int id"),
        ({"utt_id": "a", "hyp": ["x", "y"]}, r"^Top-level list outputs are not supported for 'hyp'\. .*is a list\)$"),
        ({"utt_id": "a", "hyp": ("x",)}, r"Top-level list outputs .* is a tuple\)$"),
        ({"utt_id": "a", "hyp": "two\nlines"}, "newline"),
        ({"utt_id": "a", "hyp": "cr\rhere"}, "newline"),
        ({"utt_id": "a", "hyp": "bad \udcff byte"}, "not valid UTF-8"),
        ({"utt_id": "a", "hyp": None}, "is None"),
        ({"utt_id": "a", "hyp": b"raw"}, "is bytes"),
        ({"utt_id": "a", "done": "x"}, "reserved"),
        ({"utt_id": "a", "x y": "x"}, "cannot name"),
        ({"utt_id": "a", "obj": np.array([object()])}, "object-dtype"),
        ({"utt_id": "a", "meta": {"k": {1, 2}}}, "cannot be saved as JSON"),
    ],
)
def test_bad_results_are_refused_with_one_clear_error(tmp_path, result, message):
    writers = writers_for(tmp_path)
    with pytest.raises(ContractError, match=message):
        write(writers, result)


@pytest.mark.parametrize(
    "result, error",
    [
        ("just text", TypeError),
        ({"utt_id": ("a",), "hyp": "x"}, TypeError),
        ({"utt_id": "a", "hyp": ["x"]}, TypeError),
        ({"hyp": "x"}, ValueError),
        ({"utt_id": "a b", "hyp": "x"}, ValueError),
    ],
)
def test_refusals_have_espnet3_s_exception_types(tmp_path, result, error):
    with pytest.raises(error):
        write(writers_for(tmp_path), result)


def test_missing_output_keys_are_a_key_error_and_extra_keys_allowed(tmp_path):
    writers = writers_for(tmp_path)
    with pytest.raises(KeyError, match=r"^result 'a' lacks output keys \['ref'\] \(output_keys; its keys: "):
        write(writers, {"utt_id": "a", "hyp": "x", "score": 1}, output_keys=["hyp", "ref"])
    write(writers, {"utt_id": "b", "hyp": "x", "ref": "y", "score": 1}, output_keys=["hyp", "ref"])
    assert writers["field_keys"] == ["hyp", "ref"]


def test_hyp_and_ref_keys_are_required_and_are_the_fields_without_output_keys(tmp_path):
    writers = writers_for(tmp_path)
    with pytest.raises(ValueError, match=r"^Inference output keys must include all required keys\. "
                       r"missing=\['ref', 'text'\] \(hyp_key/ref_key"):
        write(writers, {"utt_id": "a", "hyp": "x"}, hyp_key=["hyp", "text"], ref_key="ref")
    write(writers, {"utt_id": "b", "hyp": "x", "ref": "y", "score": 1}, hyp_key="hyp", ref_key="ref")
    assert writers["field_keys"] == ["hyp", "ref"]  # score is not written
    write(writers, {"utt_id": "c", "hyp": "x", "ref": "y", "score": 1}, hyp_key="hyp", ref_key="ref", output_keys=["score"])
    assert writers["field_keys"] == ["hyp", "ref", "score"]


def test_infer_s_empty_hyp_and_ref_keys_write_every_field(tmp_path):
    """``infer()`` constructs the runner with ``hyp_key=[]`` and ``ref_key=[]``; runner options reach the hooks."""
    provider = toys.SpeechProvider({"n": 2}, params={"input_key": ["speech", "text"], "output_fn_path": "toys.id_output_fn"})
    runner = InferenceRunner(provider, hyp_key=[], ref_key=[], output_dir=tmp_path / "out")
    assert runner(range(2)) is True
    assert scp_fields(tmp_path / "out") == ["feats", "n", "text"]
    assert (tmp_path / "out" / "split.0" / FIELD_KEYS_NAME).read_text() == "feats\nn\ntext\n"


def test_runner_hyp_key_option_is_checked_when_writing(tmp_path):
    runner = make_runner(tmp_path, n=2, output_fn="toys.id_output_fn", hyp_key="hyp")
    with pytest.raises(ValueError, match=r"missing=\['hyp'\]"):
        runner(range(2))


def test_resolve_idx_key(tmp_path):
    runner = make_runner(tmp_path, idx_key="sample_id")
    assert runner.resolve_idx_key({"sample_id": "u1"}) == "sample_id"
    with pytest.raises(ValueError, match=r"idx_key='sample_id' \(output keys: \['utt_id'\]\)"):
        runner.resolve_idx_key({"utt_id": "u1"})


def test_a_refused_record_writes_nothing(tmp_path):
    writers = writers_for(tmp_path)
    write(writers, {"utt_id": "ok", "hyp": "x"})
    with pytest.raises(ContractError, match="newline"):
        write(writers, {"utt_id": "bad", "feats": np.ones(3), "meta": {"a": 1}, "hyp": "a\nb"})
    shard_dir = writers["shard_dir"]
    assert not (shard_dir / "feats").exists() and not (shard_dir / "meta").exists()
    assert (shard_dir / "hyp.scp").read_text() == "ok x\n"
    assert writers["field_keys"] == ["hyp"]


def test_scalars_inline_and_zero_d_values_use_item(tmp_path):
    torch = pytest.importorskip("torch")
    writers = writers_for(tmp_path)
    write(
        writers,
        {
            "utt_id": np.int64(7),
            "i": 3,
            "f": 0.25,
            "b": True,
            "np0": np.array(1.5),
            "npf": np.float32(2.0),
            "t0": torch.tensor(4),
            "tf": torch.tensor(0.5),
            "empty": "",
        },
    )
    lines = {name: (writers["shard_dir"] / f"{name}.scp").read_text() for name in writers["field_keys"]}
    assert lines == {
        "i": "7 3\n",
        "f": "7 0.25\n",
        "b": "7 True\n",
        "np0": "7 1.5\n",
        "npf": "7 2.0\n",
        "t0": "7 4\n",
        "tf": "7 0.5\n",
        "empty": "7 \n",
    }


def test_tensors_become_npy_and_non_cpu_tensors_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    writers = writers_for(tmp_path)
    write(writers, {"utt_id": "a", "emb": torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()})
    path = read_scp(writers["shard_dir"] / "emb.scp")[0][1]
    np.testing.assert_array_equal(np.load(path), np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(ContractError, match=r"tensor on meta.*move it to CPU"):
        write(writers, {"utt_id": "b", "emb": torch.empty(3, device="meta")})


def test_segments_list_of_dicts_is_one_json_document(tmp_path):
    writers = writers_for(tmp_path)
    segments = [{"start": 0.0, "end": 1.0, "text": "hi"}]
    write(writers, {"utt_id": "a", "segments": segments})
    write(writers, {"utt_id": "b", "segments": []})
    rows = read_scp(writers["shard_dir"] / "segments.scp")
    assert json.loads(Path(rows[0][1]).read_text()) == {"segments": segments}
    assert json.loads(Path(rows[1][1]).read_text()) == {"segments": []}


def test_other_objects_are_pickled(tmp_path):
    import pickle

    writers = writers_for(tmp_path)
    write(writers, {"utt_id": "a", "obj": {1, 2, 3}})
    path = read_scp(writers["shard_dir"] / "obj.scp")[0][1]
    assert path.endswith("/obj/a.pkl")
    assert pickle.loads(Path(path).read_bytes()) == {1, 2, 3}


# ---------------------------------------------------------------- artifacts
def test_wav_artifacts_are_pcm16_at_the_configured_rate(tmp_path):
    writers = writers_for(
        tmp_path, {"audio": {"type": "wav", "sample_rate": 8000}, "pcm": {"type": "wav", "sample_rate": 16000}}
    )
    wave_in = np.array([0.0, 0.5, -0.5, 1.0, -1.5], dtype=np.float32)
    stereo = np.array([[1, -1], [2, -2], [3, -3]], dtype=np.int16)
    write(writers, {"utt_id": "a", "audio": wave_in, "pcm": stereo})
    path = read_scp(writers["shard_dir"] / "audio.scp")[0][1]
    assert path.endswith("/audio/a.wav")
    with wave.open(path) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    np.testing.assert_array_equal(samples, [0, 16384, -16384, 32767, -32767])
    with wave.open(read_scp(writers["shard_dir"] / "pcm.scp")[0][1]) as w:
        assert (w.getnchannels(), w.getframerate()) == (2, 16000)
        np.testing.assert_array_equal(np.frombuffer(w.readframes(3), dtype="<i2").reshape(3, 2), stereo)


@pytest.mark.parametrize(
    "value, message",
    [
        (np.zeros((2, 100), dtype=np.float32), "channels-first"),
        (np.array([0.1, np.nan]), "NaN"),
        (np.array([1, 2], dtype=np.int32), "dtype int32"),
        ({"a": 1}, "for arrays"),
    ],
)
def test_wav_refuses_values_it_cannot_hold(tmp_path, value, message):
    writers = writers_for(tmp_path, {"audio": {"type": "wav", "sample_rate": 8000}})
    with pytest.raises(ContractError, match=message):
        write(writers, {"utt_id": "a", "audio": value})


def test_custom_writer_gets_path_without_suffix_and_options(tmp_path):
    writers = writers_for(tmp_path, {"feats": {"writer": "toys.text_writer", "suffix": ".csv"}})
    write(writers, {"utt_id": "a", "feats": np.array([0.5, 1.0])})
    path = read_scp(writers["shard_dir"] / "feats.scp")[0][1]
    assert path == (writers["shard_dir"] / "feats" / "a.csv").resolve().as_posix()
    assert Path(path).read_text() == "0.500\n1.000\n"


def test_custom_writer_must_return_an_existing_file(tmp_path):
    writers = writers_for(tmp_path, {"feats": {"writer": "toys.bad_writer"}})
    with pytest.raises(ContractError, match="bad_writer returned .*not an existing file"):
        write(writers, {"utt_id": "a", "feats": np.ones(2)})


def test_artifacts_are_written_atomically(tmp_path, monkeypatch):
    writers = writers_for(tmp_path)
    write(writers, {"utt_id": "a", "feats": np.ones(2)})

    def torn_save(f, array, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        write(writers, {"utt_id": "b", "feats": np.ones(2)})
    assert sorted(p.name for p in (writers["shard_dir"] / "feats").iterdir()) == ["a.npy"]


@pytest.mark.parametrize(
    "artifacts, message",
    [
        ({"audio": {"type": "wav"}}, "needs sample_rate"),
        ({"audio": {"type": "wav", "sample_rate": 0}}, "needs sample_rate"),
        ({"audio": {"type": "flac"}}, "type must be one of"),
        ({"audio": {"type": "npy", "sample_rate": 8000}}, "unknown option"),
        ({"audio": {"writer": "toys.no_such_writer"}}, "has no attribute 'no_such_writer'"),
        ({"audio": {"writer": "toys.EchoModel.calls"}}, "has no attribute"),
        ({"audio": {"writer": "toys.text_writer", "type": "npy"}}, "not both"),
        ({"audio": "wav"}, "must be a mapping"),
        ({"../x": {"type": "npy"}}, "cannot name"),
    ],
)
def test_output_artifacts_are_checked_at_construction(tmp_path, artifacts, message):
    with pytest.raises(ContractError, match=message):
        make_runner(tmp_path, output_artifacts=artifacts)
    assert not (tmp_path / "out").exists()


def test_construction_checks_output_fn_and_input_key(tmp_path):
    """(An unimportable output_fn and a missing input_key: test_bad_inputs, at dry-run.)"""
    with pytest.raises(ContractError, match=r"output_fn 'toys.NoBatchModel.calls' is not callable"):
        make_runner(tmp_path, output_fn="toys.NoBatchModel.calls")
    with pytest.raises(ContractError, match="model_kwargs must be a mapping"):
        make_runner(tmp_path, model_kwargs=["scale"])
    assert not (tmp_path / "out").exists()
    provider = toys.SpeechProvider({"n": 2}, params={"input_key": "speech"})
    runner = InferenceRunner(provider, output_fn="toys.id_output_fn", output_keys="n", output_dir=tmp_path / "p")
    runner(range(2))  # input_key from params is enough
    assert read_scp(tmp_path / "p" / "n.scp") == [["utt0", "4"], ["utt1", "8"]]


# ---------------------------------------------------------------- batching
def forward(idx, model, n=3, **env):
    env.setdefault("output_fn", toys.id_output_fn)
    return InferenceRunner.forward(idx, dataset=toys.speech_dataset(n), model=model, input_key="speech", **env)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError("Unable to allocate 3.0 GiB"),
    ],
)
def test_out_of_memory_batch_is_a_runtime_error_naming_items_lengths_and_batch_size(error, monkeypatch):
    monkeypatch.setattr(toys.OOMModel, "error", error)
    with pytest.raises(RuntimeError) as info:
        forward([1, 2], toys.OOMModel())
    message = str(info.value)
    assert message.startswith("Batched inference ran out of memory on 2 items (dataset indices [1, 2], input lengths "
                              "{'speech': [8, 12]}). Lower `batch_size` in the inference config (this batch had 2 items)")
    assert info.value.__cause__ is error


def test_torch_out_of_memory_error_is_recognized(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(toys.OOMModel, "error", torch.cuda.OutOfMemoryError("allocator failed"))
    with pytest.raises(ContractError, match="ran out of memory"):
        forward([0, 1], toys.OOMModel())


def test_a_failing_batch_raises_the_model_s_own_error_after_one_call():
    toys.NoBatchModel.calls = 0
    with pytest.raises(TypeError, match="^expected an array, got a list$"):
        forward([0, 1, 2], toys.NoBatchModel())
    assert toys.NoBatchModel.calls == 1


def test_retry_items_on_batch_error_runs_items_one_at_a_time_and_warns_once_per_model(tmp_path, caplog):
    _WARNED_UNBATCHED.discard("toys.NoBatchModel")
    toys.NoBatchModel.calls = 0
    runner = make_runner(
        tmp_path, n=5, model="NoBatchModel", batch_size=2, output_fn="toys.id_output_fn", retry_items_on_batch_error=True
    )
    with caplog.at_level(logging.WARNING, logger="espnet3_rules.systems.base.inference_runner"):
        runner(range(5))
    assert read_scp(tmp_path / "out" / "n.scp") == [[f"utt{i}", str(4 * (i + 1))] for i in range(5)]
    assert toys.NoBatchModel.calls == 3 + 5  # three failed batches, five single items
    warnings = [r for r in caplog.records if "failed on a batch" in r.getMessage()]
    assert len(warnings) == 1 and "toys.NoBatchModel" in warnings[0].getMessage()
    with pytest.raises(ContractError, match="retry_items_on_batch_error must be true or false"):
        make_runner(tmp_path, retry_items_on_batch_error="yes")


def test_item_that_fails_alone_too_raises_its_own_error_noting_the_batch():
    with pytest.raises(ValueError, match="^too long: 12\n") as info:
        forward([0, 1, 2], toys.FailsOnLongModel(), retry_items_on_batch_error=True)
    assert info.value.__notes__ == [
        "(the batch [0, 1, 2] had failed first with ValueError: no batches; "
        "retry_items_on_batch_error ran its items one at a time)"
    ]


# ----------------------------------------------------------------- contract
TEXT_CONTRACT = {
    "inputs": {"text": {"kind": "text"}, "prompt": {"kind": "text", "optional": True}},
    "outputs": {"text": {"kind": "text", "normalize": ["strip", "to_lower"]}},
}


def echo_model(text, prompt=""):
    """A backend whose output shows which inputs it got."""
    if isinstance(text, list):
        return [{"text": f"  {prompt}{t.upper()} "} for t in text]
    return {"text": f"  {prompt}{text.upper()} "}


def test_contract_normalizes_outputs_attaches_the_id_and_passes_optional_inputs():
    dataset = [{"text": "Hi"}, {"text": "Yo", "prompt": "p:"}, {"text": "a"}]
    env = {"input_key": ["text", "prompt"], "inference_contract": TEXT_CONTRACT}
    assert InferenceRunner.forward(1, dataset, echo_model, **env) == {"text": "p:yo", "utt_id": "1"}
    assert InferenceRunner.forward([0, 2], dataset, echo_model, **env) == [
        {"text": "hi", "utt_id": "0"},
        {"text": "a", "utt_id": "2"},
    ]


def test_contract_refuses_optional_inputs_mixed_within_a_batch():
    dataset = [{"text": "Hi"}, {"text": "Yo", "prompt": "p:"}]
    env = {"input_key": ["text", "prompt"], "inference_contract": TEXT_CONTRACT}
    with pytest.raises(KeyError, match="Optional inputs cannot be mixed within one batch"):
        InferenceRunner.forward([0, 1], dataset, echo_model, **env)


# -------------------------------------------------------------------- merge
def test_merge_unions_fields_in_first_seen_order_taking_only_listing_shards(tmp_path):
    runner = make_runner(
        tmp_path, n=4, n_shards=4, input_key=["speech", "text"], output_fn="toys.output_fn_sparse"
    )
    root = tmp_path / "out"
    runner(range(4))
    # a stale fragment from an earlier run, in a shard that no longer lists the field
    (root / "split.1" / "extra.scp").write_text("stale x\n")
    assert (root / "split.0" / FIELD_KEYS_NAME).read_text() == "extra\nhyp\n"
    assert runner.merge([root / f"split.{i}" for i in range(4)]) is None
    assert scp_fields(root) == ["extra", "hyp"]
    assert read_scp(root / "extra.scp") == [["utt0", "e0"], ["utt2", "e2"]]
    assert [r[0] for r in read_scp(root / "hyp.scp")] == ["utt0", "utt1", "utt2", "utt3"]


def make_shards(tmp_path, shards):
    dirs = []
    for i, fields in enumerate(shards):
        shard_dir = tmp_path / "out" / f"split.{i}"
        shard_dir.mkdir(parents=True)
        for name, text in fields.items():
            (shard_dir / f"{name}.scp").write_text(text)
        (shard_dir / FIELD_KEYS_NAME).write_text("".join(f"{k}\n" for k in fields))
        dirs.append(shard_dir)
    return dirs


@pytest.mark.parametrize(
    "shards, message",
    [
        (
            [{"hyp": "a x\n", "score": "a 1\n"}, {"hyp": "b y\n", "score": "a 2\n"}],
            r"'a' appears in both .*split.0/score.scp and .*split.1/score.scp",
        ),
        ([{"hyp": "a x\na y\n"}], r"'a' appears twice in .*split.0/hyp.scp"),
        ([{"hyp": "a x\nb y"}], r"hyp.scp:2: last line has no newline"),
        ([{}, {}], "^No output keys found in inference results: no shard of "),
    ],
)
def test_merge_refuses_duplicate_ids_torn_fragments_and_empty_output(tmp_path, shards, message):
    runner = make_runner(tmp_path)
    dirs = make_shards(tmp_path, shards)
    with pytest.raises(ContractError, match=message):
        runner.merge(dirs)
    assert not (tmp_path / "out" / "hyp.scp").exists()


def test_merge_refuses_missing_fragment_and_missing_field_keys(tmp_path):
    runner = make_runner(tmp_path)
    dirs = make_shards(tmp_path, [{"hyp": "a x\n"}])
    (dirs[0] / "hyp.scp").unlink()
    with pytest.raises(ContractError, match="hyp.scp is missing although"):
        runner.merge(dirs)
    (dirs[0] / FIELD_KEYS_NAME).unlink()
    with pytest.raises(ContractError, match="field_keys.txt is missing"):
        runner.merge(dirs)


# ------------------------------------------------------------ optional deps
def test_core_imports_and_writes_text_without_torch_numpy_jiwer(tmp_path):
    code = f"""
import sys
for name in ("torch", "numpy", "jiwer"):
    sys.modules[name] = None
from pathlib import Path
import espnet3_rules, espnet3_rules.systems.base.metric, espnet3_rules.systems.esp2_asr.metrics.wer
import espnet3_rules.systems.base.artifacts
from espnet3_rules import InferenceRunner
w = InferenceRunner.open_writers(Path({str(tmp_path)!r}))
InferenceRunner.write_record(w, {{"utt_id": "a", "hyp": "x", "meta": {{"k": 1}}}}, {{}})
InferenceRunner.close_writers(w)
print(Path({str(tmp_path)!r}, "hyp.scp").read_text(), end="")
"""
    env = {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "a x\n"


# ------------------------------------------------- ESPnet3 202611's forward
@pytest.mark.parametrize("runner_cls, first_id", [(toys.StaticHooksRunner, "u4"), (toys.ClassHooksRunner, "c4")])
def test_prepare_model_inputs_and_format_output_overrides_are_called(runner_cls, first_id, tmp_path):
    dataset = [{"wave": item["speech"]} for item in toys.speech_dataset(3)]
    assert runner_cls.forward(0, dataset=dataset, model=toys.EchoModel(), input_key="wave") == {
        "utt_id": first_id, "hyp": "n=4"}
    batch = runner_cls.forward([1, 2], dataset=dataset, model=toys.EchoModel(), input_key="wave")
    assert [r["hyp"] for r in batch] == ["n=8", "n=12"]
    provider = toys.SpeechProvider({"n": 3})
    runner = runner_cls(provider, input_key="speech", output_dir=tmp_path / "out", batch_size=2)
    runner.prepare_model_inputs = None  # forward is a class method: an instance attribute cannot reach it
    with pytest.raises(KeyError, match="wave"):  # the dataset has speech, the override reads wave
        runner(range(3))


def test_super_forward_keeps_the_checked_path():
    out = toys.SuperForwardRunner.forward(0, dataset=[{"wave": np.zeros(5)}], model=toys.EchoModel(), input_key="wave")
    assert out == {"utt_id": "c5", "hyp": "n=5", "extra": "x"}
    with pytest.raises(RuntimeError, match="input_key must be provided"):
        toys.SuperForwardRunner.forward(0, dataset=[{}], model=toys.EchoModel())


@pytest.mark.parametrize(
    "env, error, message",
    [
        ({"model_kwargs": ["scale"]}, TypeError, "^model_kwargs must be a mapping when provided, got list$"),
        ({"input_key": None}, RuntimeError, r"^input_key must be provided for inference \(a runner option"),
        ({"input_key": []}, RuntimeError, "input_key must be provided for inference"),
        ({"inference_contract": {"inputs": {}}, "output_fn": "toys.id_output_fn"}, ValueError,
         "^output_fn cannot be combined with an inference contract"),
        ({"inference_contract": {"inputs": {}}, "output_fn_path": "toys.id_output_fn"}, ValueError,
         "output_fn cannot be combined"),
    ],
)
def test_forward_refuses_bad_settings_with_espnet3_s_exception_types(env, error, message):
    env = {"input_key": "speech", **env}
    with pytest.raises(error, match=message):
        InferenceRunner.forward(0, dataset=toys.speech_dataset(1), model=toys.EchoModel(), **env)


@pytest.mark.parametrize("key", ["output_fn", "output_fn_path"])
def test_output_fn_and_output_fn_path_are_applied(key):
    out = InferenceRunner.forward(0, dataset=toys.speech_dataset(1), model=toys.EchoModel(), input_key="speech",
                                  **{key: "toys.id_output_fn"})
    assert (out["utt_id"], out["n"]) == ("utt0", 4)
    out = InferenceRunner.forward([0], dataset=toys.speech_dataset(1), model=toys.EchoModel(), input_key="speech",
                                  output_fn=toys.id_output_fn)  # a callable, as ESPnet3 takes it
    assert [o["utt_id"] for o in out] == ["utt0"]


def test_optional_inputs_are_left_out_when_absent_and_may_not_be_mixed_in_a_batch():
    from espnet3_rules.systems.base.inference_runner import gather_inputs

    samples = [{"speech": 1}, {"speech": 2}]
    assert gather_inputs(samples, [0, 1], ["speech", "prompt"], {"prompt"}, True) == {"speech": [1, 2]}
    assert gather_inputs(samples[:1], [0], ["speech", "prompt"], {"prompt"}, False) == {"speech": 1}
    samples[1]["prompt"] = "p"
    with pytest.raises(KeyError, match=r"^Input key 'prompt' not found in dataset item\. Optional inputs cannot be "
                       r"mixed within one batch: some samples provide it and others do not\. \(dataset index 7;"):
        gather_inputs(samples, [7, 8], ["speech", "prompt"], {"prompt"}, True)


def test_audio_values_are_wav_at_their_rate_and_espnet3_style_writers_get_keywords(tmp_path, monkeypatch):
    try:
        from espnet3_rules.contract.kinds.audio import Audio
    except ImportError:  # the contract package is not here yet: a stand-in of its Audio (array, rate)
        import dataclasses
        import types

        Audio = dataclasses.make_dataclass("Audio", ["array", "rate"], frozen=True)
        module = types.ModuleType("espnet3_rules.contract.kinds.audio")
        module.Audio = Audio
        monkeypatch.setitem(sys.modules, module.__name__, module)
    mono = np.array([0.0, 0.5, -0.5, 0.25], dtype=np.float32)
    stereo = np.array([[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5]], dtype=np.float32)  # (channels, samples)
    writers = writers_for(tmp_path, {
        "wide": {"type": "wav", "sample_rate": 16000},
        "custom": {"writer": {"_target_": "toys.espnet3_style_writer", "precision": 1}},
    })
    write(writers, {"utt_id": "sp0.9-a", "audio": Audio(mono, 8000), "st": Audio(stereo, 22050),
                    "wide": Audio(mono, 8000), "custom": Audio(mono, 8000)})
    rows = {name: read_scp(writers["shard_dir"] / f"{name}.scp")[0][1] for name in ("audio", "st", "wide", "custom")}
    assert rows["audio"].endswith("/split.0/audio/sp0.9-a.wav")
    with wave.open(rows["audio"]) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (1, 8000, 4)
    with wave.open(rows["st"]) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (2, 22050, 3)
        assert np.frombuffer(w.readframes(1), dtype="<i2").tolist() == [16384, -16384]
    with wave.open(rows["wide"]) as w:
        assert w.getframerate() == 16000  # a configured rate wins, as ESPnet3
    assert rows["custom"].endswith("/split.0/custom/sp0.9-a.txt")
    assert Path(rows["custom"]).read_text() == "rate=8000\n0.0\n0.5\n-0.5\n0.2\n"
