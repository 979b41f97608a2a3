"""espnet3_rules.contract: fields, kinds, normalizers and the inference config's ``contract:`` section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from espnet3_rules.contract import KINDS, Field, Kind, check_declaration, register_kind, register_normalizer
from espnet3_rules.contract.inference import (
    load_inference_contract,
    prepare_inference_inputs,
    resolve_inference_contract,
    validate_inference_outputs,
)
from espnet3_rules.contract.kinds import Audio, AudioKind, NumberKind, SegmentsKind, TextKind
from espnet3_rules.contract.normalizers import NORMALIZERS
from espnet3_rules.engine.contracts import ContractError

import toys

REPO = Path(__file__).resolve().parents[1]
AT_16K = SimpleNamespace(sample_rate=16000)
TEXT_IO = {"inputs": {"text": {"kind": "text"}}, "outputs": {"text": {"kind": "text"}}}


@pytest.fixture(autouse=True)
def registries():
    """Restore KINDS, NORMALIZERS and the imported recipe modules after each test."""
    kinds, normalizers, modules = dict(KINDS), dict(NORMALIZERS), set(sys.modules)
    yield
    for registry, saved in ((KINDS, kinds), (NORMALIZERS, normalizers)):
        registry.clear()
        registry.update(saved)
    for name in set(sys.modules) - modules:
        if name.startswith("recipe_"):
            del sys.modules[name]


def contract(inputs=None, outputs=None, **extra):
    return load_inference_contract({"inputs": inputs or TEXT_IO["inputs"], "outputs": outputs or TEXT_IO["outputs"],
                                    **extra})


# --- Field, check_declaration


def test_field_fills_its_label_and_keeps_its_options():
    spec = Field("reference_speech", "audio", optional=True, options={"sample_rate": 8000})
    assert (spec.label, spec.optional, spec.channels, spec.options) == ("Reference speech", True, None,
                                                                       {"sample_rate": 8000})
    assert Field("text", "text", "Transcription").label == "Transcription"


@pytest.mark.parametrize("args, kwargs, error, words", [
    (("x", "video"), {}, ValueError, r"Field 'x' has kind 'video'; known kinds are \['audio', 'number'"),
    (("2x", "text"), {}, ValueError, "must be a Python identifier"),
    (("x", "audio"), {"channels": 0}, ValueError, "channels must be None or >= 1"),
    (("x", "text"), {"options": ["strip"]}, TypeError, "Field.options must be a mapping"),
    (("x", "text"), {"options": {"bogus": 1}}, ValueError, r"Unknown TextKind option\(s\): \['bogus'\]"),
    (("x", "text"), {"options": {"normalize": [1]}}, TypeError, "normalize must contain normalizer names"),
    (("x", "text"), {"options": {"normalize": ["nope"]}}, ValueError,
     r"Unknown inference normalizer\(s\): \['nope'\]"),
    (("x", "text"), {"options": {"normalize": ["first_channel"]}}, ValueError, "normalizer"),  # audio's, not text's
    (("x", "audio"), {"options": {"sample_rate": True}}, ValueError, "sample_rate must be a positive integer"),
    (("x", "audio"), {"options": {"rate_policy": "keep"}}, ValueError, "rate_policy must be 'resample' or 'reject'"),
])
def test_field_refuses_a_bad_declaration(args, kwargs, error, words):
    with pytest.raises(error, match=words):
        Field(*args, **kwargs)


def declares(inputs, outputs):
    return type("Decl", (), {"inputs": inputs, "outputs": outputs})


@pytest.mark.parametrize("inputs, outputs, words", [
    ([Field("a", "text")], (Field("b", "text"),), "Decl.inputs must be a tuple of Field"),
    ((), (Field("b", "text"),), "Decl.inputs must name at least one field"),
    ((Field("a", "text"), Field("a", "number")), (Field("b", "text"),), r"Decl.inputs repeats a name: \['a', 'a'\]"),
    ((Field("a", "text", optional=True), Field("b", "text")), (Field("c", "text"),),
     "must list required fields before optional ones"),
    ((Field("a", "text"),), (Field("b", "text", optional=True),), "Decl: outputs cannot be optional"),
])
def test_check_declaration_names_the_rule_broken(inputs, outputs, words):
    with pytest.raises(TypeError, match=words):
        check_declaration(declares(inputs, outputs))


def test_check_declaration_passes_a_good_declaration_and_reads_an_instance():
    good = declares((Field("a", "text"), Field("b", "text", optional=True)), (Field("c", "text"),))
    check_declaration(good)
    instance = good()
    instance.extra_in, instance.extra_out = (Field("x", "number"),), ()
    with pytest.raises(TypeError, match="Decl.extra_out must name"):
        check_declaration(instance, "extra_in", "extra_out")


# --- registries


def test_register_normalizer_refuses_non_callables_and_taken_names():
    with pytest.raises(TypeError, match="normalizer must be callable"):
        register_normalizer("bad", "upper")
    register_normalizer("shout", str.upper)
    with pytest.raises(ValueError, match="normalizer 'shout' is already registered"):
        register_normalizer("shout", str.lower)
    register_normalizer("shout", str.lower, replace=True)
    assert NORMALIZERS["shout"]("Hi") == "hi"


def test_a_registered_normalizer_wins_over_the_kinds_own():
    register_normalizer("strip", lambda text: text.strip("*"))
    assert TextKind().apply("*a *", Field("t", "text"), None, {"normalize": "strip"}, output=False) == "a "


def test_register_kind_adds_a_modality():
    messages = toys.contract_kind_class(Kind)()
    with pytest.raises(TypeError, match="a kind is a Kind instance, not str"):
        register_kind("messages", "messages")
    register_kind("messages", messages)
    with pytest.raises(ValueError, match="kind 'messages' is already registered; pass replace=True"):
        register_kind("messages", messages)
    register_kind("messages", messages, replace=True)
    spec = Field("chat", "messages")
    assert messages.check(["hi"], spec, None, output=False) == ["hi"]
    assert messages.is_batch([["a"], ["b"]], spec, None) and not messages.is_batch(["a"], spec, None)
    assert messages.accepts(["a"], spec) and not messages.accepts("a", spec)
    with pytest.raises(NotImplementedError, match="MessagesKind does not say how two pieces join"):
        messages.join(["a"], ["b"])


# --- text, number, segments


def test_text_kind_checks_normalizes_in_order_and_joins():
    kind, spec = TextKind(), Field("text", "text")
    assert kind.apply("  Hi ", spec, None, {"normalize": ["strip", "to_upper"]}, output=False) == "HI"
    assert kind.apply(" Hi", spec, None, {"normalize": "to_lower"}, output=True) == " hi"
    assert kind.join("a", "b") == "ab" and kind.to_model_input("a", spec) == "a" and kind.to_demo_output("a") == "a"
    with pytest.raises(TypeError, match="'text' returned as int, must be str"):
        kind.check(7, spec, None, output=True)
    with pytest.raises(TypeError, match="'text' given as"):
        kind.check(None, spec, None, output=False)


def test_a_normalizer_result_is_checked_again():
    register_normalizer("break_it", lambda text: len(text))
    with pytest.raises(TypeError, match="must be str"):
        TextKind().apply("hi", Field("t", "text"), None, {"normalize": ["break_it"]}, output=True)


@pytest.mark.parametrize("value", [4, 4.3, np.float32(4.3), np.int64(2)])
def test_number_kind_accepts_real_numbers(value):
    assert NumberKind().check(value, Field("WER", "number"), None, output=True) is value


@pytest.mark.parametrize("value", [True, np.bool_(False), "4.3", 1j, None])
def test_number_kind_refuses_bools_and_non_reals(value):
    with pytest.raises(TypeError, match=f"'WER' returned as {type(value).__name__}, must be a real number"):
        NumberKind().check(value, Field("WER", "number"), None, output=True)


def test_segments_kind_wants_dicts_with_text_start_end():
    kind, spec = SegmentsKind(), Field("segments", "segments")
    spans = [{"text": "hi", "start": 0.0, "end": 0.4, "score": 0.9}]
    assert kind.check(spans, spec, None, output=True) is spans
    assert kind.join(spans, spans) == spans + spans
    for bad in ([(0.0, 0.4)], [{"text": "hi", "start": 0.0}], {"text": "hi", "start": 0, "end": 1}):
        with pytest.raises(TypeError, match="'segments' returned must be a list of dicts with text, start and end"):
            kind.check(bad, spec, None, output=True)


# --- Audio


def test_audio_scales_integer_pcm_and_casts_floats():
    assert Audio(np.array([-32768, 0, 16384], np.int16), 8000).array.tolist() == [-1.0, 0.0, 0.5]
    assert Audio(np.array([0, 128, 192], np.uint8), 8000).array.tolist() == [-1.0, 0.0, 0.5]
    floats = Audio(np.array([1.5, -2.0]), 8000.9)
    assert floats.array.dtype == np.float32 and floats.array.tolist() == [1.5, -2.0] and floats.rate == 8000


def test_audio_lays_channels_first_and_one_channel_out_as_mono():
    stereo = Audio(np.zeros((100, 2), np.float32), 100)
    assert (stereo.array.shape, stereo.channels, stereo.duration) == ((2, 100), 2, 1.0)
    assert Audio(np.zeros((100, 1)), 100).array.shape == (100,)
    assert Audio(np.zeros((2, 1)), 100).array.shape == (2, 1)  # too short to tell: channels first
    assert stereo.mono().array.shape == (100,) and stereo.mono().mono().array.shape == (100,)
    assert Audio(np.zeros(5), 100).multichannel().array.shape == (1, 5)
    assert stereo.multichannel() is stereo


@pytest.mark.parametrize("array, rate, error, words", [
    (np.zeros(3, complex), 8000, TypeError, "audio samples must be real numeric values"),
    (np.array([True]), 8000, TypeError, "real numeric"),
    (np.array([0.0, np.nan]), 8000, ValueError, r"audio samples must be finite \(no NaN or Inf\)"),
    (np.array([1e300]), 8000, ValueError, "finite"),  # overflows float32
    (np.zeros((2, 3, 4)), 8000, ValueError, r"audio must be 1-D or 2-D, got shape \(2, 3, 4\)"),
    (np.zeros(3), 0, ValueError, "sample rate must be positive, got 0"),
])
def test_audio_refuses_bad_samples_and_rates(array, rate, error, words):
    with pytest.raises(error, match=words):
        Audio(array, rate)


def test_audio_concat_joins_in_time_at_one_rate_and_channel_count():
    mono = Audio(np.ones(4, np.float32), 8)
    joined = Audio.concat([mono, mono.multichannel()])
    assert joined.array.tolist() == [1.0] * 8 and AudioKind().join(mono, mono).duration == 1.0
    with pytest.raises(ValueError, match=r"cannot concatenate audio at rates \[8, 16\]"):
        Audio.concat([mono, Audio(np.ones(4), 16)])
    with pytest.raises(ValueError, match=r"cannot concatenate audio with \[1, 2\] channels"):
        Audio.concat([mono, Audio(np.ones((2, 4)), 8)])


def wav(tmp_path, rate=8000, channels=1, frames=800):
    soundfile = pytest.importorskip("soundfile")
    path = tmp_path / "utt.wav"
    samples = (np.arange(frames * channels).reshape(frames, channels) % 200 - 100).astype(np.int16)
    soundfile.write(str(path), samples, rate)
    return path, samples


def test_audio_coerce_takes_each_form_a_caller_holds(tmp_path):
    path, samples = wav(tmp_path, channels=2)
    for form in (path, str(path)):
        read = Audio.coerce(form, None)
        assert read.rate == 8000 and read.array.shape == (2, 800)
        np.testing.assert_array_equal(read.array, samples.T / 32768.0)
    pair = Audio.coerce((np.int32(8000), np.zeros(10)), None)
    assert pair.rate == 8000 and Audio.coerce([8000, np.zeros(10)], 8000).rate == 8000
    assert Audio.coerce(np.zeros(10), 16000).rate == 16000
    assert Audio.coerce(pair, None) is pair and Audio.coerce(pair, 8000) is pair
    with pytest.raises(TypeError, match="a bare array carries no sample rate, and this model fixes none"):
        Audio.coerce(np.zeros(10), None)
    with pytest.raises(TypeError, match="audio must be a path, an Audio, a .rate, samples. pair, an array or a "
                                        "tensor, not dict"):
        Audio.coerce({"rate": 1}, 8000)


def test_audio_coerce_refuses_an_audio_whose_buffer_was_made_non_finite():
    audio = Audio(np.zeros(4, np.float32), 8)
    audio.array[0] = np.inf
    with pytest.raises(ValueError, match="finite"):
        Audio.coerce(audio, None)


def test_audio_coerce_takes_a_torch_tensor():
    torch = pytest.importorskip("torch")
    audio = Audio.coerce(torch.zeros(2, 160), 16000)
    assert (audio.rate, audio.channels, audio.array.dtype) == (16000, 2, np.float32)
    assert AudioKind().accepts(torch.zeros(3), Field("x", "audio"))


def test_audio_resamples_with_librosa_every_channel():
    librosa = pytest.importorskip("librosa")
    samples = np.sin(np.arange(2 * 1600).reshape(2, 1600) / 5.0).astype(np.float32)
    audio = Audio(samples, 16000).resample(8000)
    np.testing.assert_array_equal(audio.array, librosa.resample(samples, orig_sr=16000, target_sr=8000, axis=-1))
    assert (audio.rate, audio.array.shape) == (8000, (2, 800))
    assert audio.resample(8000) is audio


def test_resampling_without_librosa_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "librosa", None)
    with pytest.raises(ModuleNotFoundError, match=r"resampling audio from 16000 Hz to 8000 Hz needs librosa "
                                                  r"\(pip install librosa\)"):
        Audio(np.zeros(16), 16000).resample(8000)


# --- AudioKind


def test_audio_kind_check_uses_the_models_rate_and_the_fields_channels():
    kind, stereo = AudioKind(), (16000, np.zeros((160, 2), np.float32))
    assert kind.check(stereo, Field("mix", "audio"), AT_16K, output=False).channels == 2
    with pytest.raises(TypeError, match=r"'mix' given with 1 channel\(s\), needs 2"):
        kind.check((16000, np.zeros(160)), Field("mix", "audio", channels=2), AT_16K, output=False)
    returned = kind.check(np.zeros(160), Field("speech", "audio"), AT_16K, output=True)
    assert (returned.rate, returned.array.shape) == (16000, (160,))
    with pytest.raises(TypeError, match="'speech' returned as a bare array by a model that fixes no sample_rate"):
        kind.check(np.zeros(160), Field("speech", "audio"), SimpleNamespace(sample_rate=None), output=True)


def test_audio_kind_option_rate_wins_over_the_models():
    pytest.importorskip("librosa")
    spec = Field("speech", "audio", options={"sample_rate": 8000})
    audio = AudioKind().apply((16000, np.zeros(1600, np.float32)), spec, AT_16K, spec.options, output=False)
    assert (audio.rate, audio.array.shape) == (8000, (800,))
    no_model = AudioKind().apply(np.zeros(80), spec, None, spec.options, output=False)
    assert no_model.rate == 8000


def test_rate_policy_reject_refuses_another_rate(tmp_path):
    path, _ = wav(tmp_path, rate=8000)
    options = {"sample_rate": 16000, "rate_policy": "reject"}
    spec = Field("speech", "audio", options=options)
    for value in ((8000, np.zeros(80)), path, Audio(np.zeros(80), 8000)):
        with pytest.raises(ValueError, match="'speech' has sample rate 8000; expected 16000"):
            AudioKind().apply(value, spec, None, options, output=False)
    assert AudioKind().apply(np.zeros(80), spec, None, options, output=False).rate == 16000  # carries no rate
    assert AudioKind().apply((16000, np.zeros(80)), spec, None, options, output=False).rate == 16000


def test_channel_normalizers_run_before_the_channel_check():
    stereo = (16000, np.stack([np.ones(160), 3 * np.ones(160)]).astype(np.float32))
    kind = AudioKind()
    for name, value in (("first_channel", 1.0), ("mean_channels", 2.0)):
        options = {"normalize": [name]}
        spec = Field("speech", "audio", channels=1, options=options)
        audio = kind.apply(stereo, spec, AT_16K, options, output=False)
        assert audio.array.shape == (160,) and set(audio.array.tolist()) == {value}
    with pytest.raises(TypeError, match="needs 1"):
        kind.apply(stereo, Field("speech", "audio", channels=1), AT_16K, {}, output=False)


def test_audio_kind_demo_output_accepts_and_is_batch():
    kind, spec = AudioKind(), Field("speech", "audio")
    rate, samples = kind.to_demo_output(Audio(np.zeros((2, 50)), 100))
    assert (rate, samples.shape) == (100, (50, 2)) and kind.to_demo_output("x") == "x"
    assert all(kind.accepts(v, spec) for v in (np.zeros(3), (8000, [0.0]), "a.wav", Audio(np.zeros(3), 8)))
    assert not kind.accepts(42, spec) and not kind.accepts([0.1, 0.2], spec)
    assert kind.is_batch([np.zeros(3), np.zeros(4)], spec, AT_16K)
    assert not kind.is_batch([16000, np.zeros(3)], spec, AT_16K)


# --- load_inference_contract / resolve_inference_contract


def test_load_builds_fields_from_config_keys_and_kind_options():
    loaded = load_inference_contract(OmegaConf.create({
        "inputs": {"speech": {"kind": "audio", "sample_rate": 16000, "channels": 1, "label": "Speech input"},
                   "prompt": {"kind": "text", "optional": True}},
        "outputs": {"text": {"kind": "text", "normalize": ["strip"]}},
    }))
    speech, prompt = loaded.inputs
    assert (speech.name, speech.kind, speech.channels, speech.label, dict(speech.options)) == (
        "speech", "audio", 1, "Speech input", {"sample_rate": 16000})
    assert [spec.name for spec in loaded.inputs if spec.optional] == ["prompt"]  # what the runner's batch rule reads
    assert loaded.outputs[0].options == {"normalize": ["strip"]} and loaded.imports == ()
    assert load_inference_contract(None) is None


@pytest.mark.parametrize("config, error, words", [
    (["inputs"], TypeError, "inference contract must be a mapping"),
    ({**TEXT_IO, "extra": 1}, ValueError, r"Unknown inference contract option\(s\): \['extra'\]"),
    ({**TEXT_IO, "imports": "recipe_x"}, TypeError, "contract.imports must be a list of module names"),
    ({**TEXT_IO, "imports": 3}, TypeError, "contract.imports must be a list of module names"),
    ({**TEXT_IO, "imports": ["ok", ""]}, TypeError, "contract.imports must contain module names"),
    ({"outputs": TEXT_IO["outputs"]}, ValueError, "inference contract.inputs must be a nonempty mapping"),
    ({"inputs": TEXT_IO["inputs"], "outputs": {}}, ValueError, "inference contract.outputs must be a nonempty"),
    ({"inputs": {"text": "text"}, "outputs": TEXT_IO["outputs"]}, TypeError, "contract.inputs.text must be a mapping"),
    ({"inputs": {"text": {}}, "outputs": TEXT_IO["outputs"]}, ValueError, "Field 'text' has kind None"),
    ({"inputs": TEXT_IO["inputs"], "outputs": {"t": {"kind": "text", "optional": True}}}, ValueError,
     "inference contract outputs cannot be optional"),
])
def test_load_refuses_a_bad_contract(config, error, words):
    with pytest.raises(error, match=words):
        load_inference_contract(config)


def test_imports_load_a_module_that_registers_a_normalizer(tmp_path, monkeypatch):
    toys.write_contract_module(tmp_path, "recipe_norm")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = contract(outputs={"text": {"kind": "text", "normalize": ["strip", "recipe_norm_shout"]}},
                      imports=["recipe_norm"])
    assert loaded.imports == ("recipe_norm",)
    assert validate_inference_outputs({"text": " hi "}, 0, loaded, None, {0: {}}, "utt_id")["text"] == "HI!"


def test_imports_are_refused_without_trust_and_a_missing_module_says_so(tmp_path, monkeypatch):
    toys.write_contract_module(tmp_path, "recipe_untrusted")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"contract.imports requires trust_user_code=True"):
        load_inference_contract({**TEXT_IO, "imports": ["recipe_untrusted"]}, allow_imports=False)
    assert "recipe_untrusted" not in sys.modules and "recipe_untrusted_shout" not in NORMALIZERS
    with pytest.raises(ModuleNotFoundError, match="recipe_absent"):
        load_inference_contract({**TEXT_IO, "imports": ["recipe_absent"]})


def test_resolve_loads_a_mapping_with_its_recipe_root_on_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    toys.write_contract_module(tmp_path, "recipe_rooted")
    raw = {"inputs": {"text": {"kind": "text", "normalize": "recipe_rooted_shout"}}, "outputs": TEXT_IO["outputs"],
           "imports": ["recipe_rooted"]}
    resolved = resolve_inference_contract(raw, tmp_path)
    assert sys.path[0] == str(tmp_path) and resolved.inputs[0].options == {"normalize": "recipe_rooted_shout"}
    assert resolve_inference_contract(resolved) is resolved and resolve_inference_contract(None) is None
    with pytest.raises(TypeError, match="inference_contract must be an InferenceContract"):
        resolve_inference_contract("contract.yaml")


# --- InferenceContract


def test_prepare_input_checks_declared_inputs_and_passes_the_rest():
    loaded = contract(inputs={"text": {"kind": "text", "normalize": "strip"},
                              "prompt": {"kind": "text", "optional": True}})
    assert loaded.prepare_input({"text": " a ", "utt_id": "u1", "prompt": "p"}, None) == {
        "text": "a", "utt_id": "u1", "prompt": "p"}
    assert loaded.prepare_input({"text": "a", "prompt": None}, None) == {"text": "a"}
    assert loaded.prepare_input({"text": "a"}, None) == {"text": "a"}
    with pytest.raises(TypeError, match="inference input must be a mapping"):
        loaded.prepare_input(["a"], None)
    with pytest.raises(KeyError, match="Required inference input 'text' is missing"):
        loaded.prepare_input({"prompt": "p"}, None)
    with pytest.raises(TypeError, match="must be str"):  # a required input given as None goes to its kind
        loaded.prepare_input({"text": None}, None)


def test_prepare_input_hands_the_backend_audio_at_its_rate():
    loaded = contract(inputs={"speech": {"kind": "audio"}})
    prepared = loaded.prepare_input({"speech": np.zeros(160, np.int16)}, AT_16K)["speech"]
    assert isinstance(prepared, Audio) and prepared.rate == 16000


def test_validate_input_keys_wants_exactly_the_declared_inputs():
    loaded = contract(inputs={"speech": {"kind": "audio"}, "prompt": {"kind": "text", "optional": True}})
    loaded.validate_input_keys(["prompt", "speech"])
    with pytest.raises(ValueError, match="inference input_key is required by the contract"):
        loaded.validate_input_keys(None)
    for bad in ("speech", ["speech", "speech", "prompt"], ["speech", "prompt", "text"]):
        with pytest.raises(ValueError, match=r"inference input_key must match contract.inputs; input_key=\["):
            loaded.validate_input_keys(bad)


def test_prepare_output_checks_the_declared_outputs_and_attaches_the_id():
    loaded = contract(outputs={"text": {"kind": "text", "normalize": "to_upper"}, "score": {"kind": "number"}})
    out = loaded.prepare_output({"score": 1.5, "text": "a"}, None, idx=3, idx_key="utt_id", sample={})
    assert out == {"text": "A", "score": 1.5, "utt_id": "3"} and list(out) == ["text", "score", "utt_id"]
    from_sample = loaded.prepare_output({"score": 1, "text": "a"}, None, idx=3, idx_key="utt_id",
                                        sample={"utt_id": "u3"})
    from_result = loaded.prepare_output({"score": 1, "text": "a", "utt_id": "r3"}, None, idx=3, idx_key="utt_id",
                                        sample={"utt_id": "u3"})
    assert (from_sample["utt_id"], from_result["utt_id"]) == ("u3", "r3")


@pytest.mark.parametrize("result, idx_key, error, words", [
    ("a", "utt_id", TypeError, "A backend with an inference contract must return a mapping"),
    ({"text": "a", "extra": 1, "more": 2}, "utt_id", ValueError,
     r"Undeclared inference output\(s\): \['extra', 'more'\]"),
    ({}, "utt_id", KeyError, "Required inference output 'text' is missing"),
    ({"text": "a"}, "text", ValueError, "'text' is reserved for the sample identifier"),
    ({"text": 1}, "utt_id", TypeError, "'text' returned as int"),
])
def test_prepare_output_refuses_what_the_contract_does_not_declare(result, idx_key, error, words):
    with pytest.raises(error, match=words):
        contract().prepare_output(result, None, idx=0, idx_key=idx_key, sample={})


def test_inputs_and_outputs_of_a_batch_are_keyed_and_split_per_sample():
    loaded = contract(outputs={"text": {"kind": "text"}, "score": {"kind": "number"}})
    dataset = [{"text": "a"}, {"text": "b", "utt_id": "ub"}]
    prepared, original = prepare_inference_inputs(dataset, [0, 1], loaded, None)
    assert prepared == {0: {"text": "a"}, 1: {"text": "b", "utt_id": "ub"}} and original[1] is dataset[1]
    assert prepare_inference_inputs(dataset, 1, loaded, None)[0] == {1: {"text": "b", "utt_id": "ub"}}
    expected = [{"text": "A", "score": 1, "utt_id": "0"}, {"text": "B", "score": 2, "utt_id": "ub"}]
    split = validate_inference_outputs({"text": ["A", "B"], "score": (1, 2)}, [0, 1], loaded, None, original, "utt_id")
    listed = validate_inference_outputs([{"text": "A", "score": 1}, {"text": "B", "score": 2}], (0, 1), loaded, None,
                                        original, "utt_id")
    assert split == listed == expected
    single = validate_inference_outputs({"text": "B", "score": 2}, 1, loaded, None, original, "utt_id")
    assert single == expected[1]


def test_a_batch_needs_one_mapping_per_sample():
    loaded = contract()
    with pytest.raises(ValueError, match="Contracted inference must return one mapping per input sample"):
        validate_inference_outputs({"text": ["A", "B", "C"]}, [0, 1], loaded, None, {0: {}, 1: {}}, "utt_id")
    with pytest.raises(TypeError, match="returned as list"):  # a dict of lists is split only for a batch
        validate_inference_outputs({"text": ["A"]}, 0, loaded, None, {0: {}}, "utt_id")


def test_contract_errors_are_contract_errors_of_espnets_types():
    with pytest.raises(ContractError) as caught:
        contract().prepare_output({}, None, idx=0, idx_key="utt_id", sample={})
    assert isinstance(caught.value, KeyError)


def test_the_contract_package_imports_without_numpy_and_checks_text():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'numpy': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from espnet3_rules.contract.inference import load_inference_contract, validate_inference_outputs\n"
        "c = load_inference_contract({'inputs': {'t': {'kind': 'text'}}, 'outputs': {'n': {'kind': 'number'}}})\n"
        "print(validate_inference_outputs({'n': 2}, 0, c, None, {0: {}}, 'utt_id'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "{'n': 2, 'utt_id': '0'}"
