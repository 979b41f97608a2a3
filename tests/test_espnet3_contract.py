"""espnet3_rules.contract against the real ESPnet3 202611 ``espnet3.contract``, side by side.

Each case is user code written once against a contract package ``m`` (ours or
ESPnet3's, the import prefix being the only difference); both runs must return
the same values (arrays equal, Audio as its rate and samples) or raise errors of
ESPnet3's type whose message contains ESPnet3's.
"""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import toys
from espnet3_wheel import espnet3_root  # noqa: F401  (session fixture)

PREFIXES = ("espnet3", "espnet3_rules")
AT_16K = SimpleNamespace(sample_rate=16000)
TEXT_IO = {"inputs": {"text": {"kind": "text"}}, "outputs": {"text": {"kind": "text"}}}


def package(prefix):
    """The contract modules under ``prefix``, as one namespace."""
    mod = lambda name: importlib.import_module(f"{prefix}.contract{name}")  # noqa: E731
    root, inference, kinds, normalizers = mod(""), mod(".inference"), mod(".kinds"), mod(".normalizers")
    return SimpleNamespace(prefix=prefix, root=root, inference=inference, kinds=kinds, normalizers=normalizers,
                           Field=root.Field, Audio=kinds.Audio)


@pytest.fixture
def impls(espnet3_root):  # noqa: F811
    """(ESPnet3's package, ours); their registries are restored afterwards."""
    pair = tuple(package(prefix) for prefix in PREFIXES)
    saved = [(registry, dict(registry)) for m in pair for registry in (m.kinds.KINDS, m.normalizers.NORMALIZERS)]
    yield pair
    for registry, contents in saved:
        registry.clear()
        registry.update(contents)


def plain(value):
    """``value`` with each Audio (of either package) as ``("Audio", rate, array)``, containers rebuilt."""
    if type(value).__name__ == "Audio" and hasattr(value, "rate"):
        return ("Audio", value.rate, value.array)
    if isinstance(value, dict):
        return {key: plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def assert_same(ours, theirs, where="result"):
    if isinstance(theirs, np.ndarray):
        assert isinstance(ours, np.ndarray) and ours.dtype == theirs.dtype, f"{where}: {ours!r} vs {theirs!r}"
        np.testing.assert_array_equal(ours, theirs, err_msg=where)
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), f"{where}: keys {list(ours)} vs {list(theirs)}"
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), f"{where}: {ours!r} vs {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, f"{where}: {ours!r} vs {theirs!r}"


def outcome(fn, m):
    try:
        return plain(fn(m)), None
    except Exception as exc:  # noqa: BLE001 - the exception is what is compared
        return None, exc


def words(exc):
    return str(exc.args[0]) if exc.args else ""


def same(impls, fn):
    """Run ``fn(m)`` with ESPnet3's package and with ours; assert the same outcome; return ESPnet3's."""
    (theirs, their_error), (ours, our_error) = (outcome(fn, m) for m in impls)
    if isinstance(their_error, ModuleNotFoundError) and their_error.name == "librosa":
        pytest.skip("resampling needs librosa (ESPnet3's resampler, and ours), which is not installed")
    if their_error is not None:
        assert our_error is not None, f"ESPnet3 raised {their_error!r}; we returned {ours!r}"
        assert isinstance(our_error, type(their_error)), f"{our_error!r} is not a {type(their_error).__name__}"
        assert words(their_error) in words(our_error), f"{words(our_error)!r} lacks {words(their_error)!r}"
        return their_error
    assert our_error is None, f"ESPnet3 returned {theirs!r}; we raised {our_error!r}"
    assert_same(ours, theirs)
    return theirs


def infer(config, dataset, idx, result, model=AT_16K, idx_key="utt_id"):
    """The contract path of a runner call: load, prepare the items, check the backend's result."""
    def run(m):
        contract = m.inference.load_inference_contract(config() if callable(config) else config)
        prepared, original = m.inference.prepare_inference_inputs(dataset(), idx, contract, model)
        returned = result(prepared) if callable(result) else result
        return prepared, m.inference.validate_inference_outputs(returned, idx, contract, model, original, idx_key)
    return run


def stereo_int16(frames=1600):
    return (np.arange(2 * frames).reshape(frames, 2) % 300 - 150).astype(np.int16)


def tone(frames=1600, rate=8000):
    return np.sin(2 * np.pi * 440 * np.arange(frames) / rate).astype(np.float32)


AUDIO_IN = {"speech": {"kind": "audio"}}
CASES = {
    "text normalizers, batch dict of lists, id from the item": infer(
        {"inputs": {"text": {"kind": "text", "normalize": ["strip", "to_lower"]}},
         "outputs": {"text": {"kind": "text", "normalize": "to_upper"}, "score": {"kind": "number"}}},
        lambda: [{"text": " A b "}, {"text": "C ", "utt_id": "u1"}], [0, 1],
        lambda prepared: {"text": [prepared[0]["text"], prepared[1]["text"]], "score": [1, np.float32(0.5)]}),
    "batch list of mappings, id from the result": infer(
        TEXT_IO, lambda: [{"text": "a"}, {"text": "b"}], (0, 1), [{"text": "x", "utt_id": "r0"}, {"text": "y"}]),
    "optional input absent or None": infer(
        {"inputs": {"text": {"kind": "text"}, "prompt": {"kind": "text", "optional": True}},
         "outputs": TEXT_IO["outputs"]},
        lambda: [{"text": "a"}, {"text": "b", "prompt": None}, {"text": "c", "prompt": "p"}], [0, 1, 2],
        {"text": ["a", "b", "c"]}),
    "required input missing": infer(TEXT_IO, lambda: [{"speech": 1}], 0, {"text": "a"}),
    "required input None": infer(TEXT_IO, lambda: [{"text": None}], 0, {"text": "a"}),
    "item not a mapping": infer(TEXT_IO, lambda: ["a"], 0, {"text": "a"}),
    "int16 stereo kept at the model rate": infer(
        {"inputs": AUDIO_IN, "outputs": {"speech": {"kind": "audio"}}},
        lambda: [{"speech": stereo_int16()}], 0, lambda prepared: {"speech": prepared[0]["speech"]}),
    "uint8 and float64 input": infer(
        {"inputs": {"a": {"kind": "audio"}, "b": {"kind": "audio"}}, "outputs": TEXT_IO["outputs"]},
        lambda: [{"a": np.arange(256, dtype=np.uint8), "b": np.linspace(-2, 2, 101)}], 0, {"text": "ok"}),
    "pair at 8 kHz resampled to the model's 16 kHz": infer(
        {"inputs": AUDIO_IN, "outputs": TEXT_IO["outputs"]}, lambda: [{"speech": (8000, tone())}], 0, {"text": "a"}),
    "field sample_rate wins, stereo resampled, mean_channels then channels 1": infer(
        {"inputs": {"speech": {"kind": "audio", "sample_rate": 8000, "channels": 1, "normalize": "mean_channels"}},
         "outputs": TEXT_IO["outputs"]},
        lambda: [{"speech": (22050, stereo_int16(2205))}], 0, {"text": "a"}),
    "first_channel": infer(
        {"inputs": {"speech": {"kind": "audio", "channels": 1, "normalize": ["first_channel"]}},
         "outputs": TEXT_IO["outputs"]},
        lambda: [{"speech": (16000, stereo_int16())}], 0, {"text": "a"}),
    "channels 1 refuses stereo": infer(
        {"inputs": {"speech": {"kind": "audio", "channels": 1}}, "outputs": TEXT_IO["outputs"]},
        lambda: [{"speech": (16000, stereo_int16())}], 0, {"text": "a"}),
    "rate_policy reject": infer(
        {"inputs": {"speech": {"kind": "audio", "rate_policy": "reject"}}, "outputs": TEXT_IO["outputs"]},
        lambda: [{"speech": (8000, tone())}], 0, {"text": "a"}),
    "rate_policy reject passes a bare array": infer(
        {"inputs": {"speech": {"kind": "audio", "rate_policy": "reject"}}, "outputs": TEXT_IO["outputs"]},
        lambda: [{"speech": tone()}], 0, {"text": "a"}),
    "bare array with no rate anywhere": infer(
        {"inputs": AUDIO_IN, "outputs": TEXT_IO["outputs"]}, lambda: [{"speech": tone()}], 0, {"text": "a"},
        model=None),
    "NaN samples": infer(
        {"inputs": AUDIO_IN, "outputs": TEXT_IO["outputs"]}, lambda: [{"speech": np.array([0.0, np.nan])}], 0,
        {"text": "a"}),
    "3-D samples": infer(
        {"inputs": AUDIO_IN, "outputs": TEXT_IO["outputs"]}, lambda: [{"speech": np.zeros((2, 2, 4))}], 0,
        {"text": "a"}),
    "not audio": infer(
        {"inputs": AUDIO_IN, "outputs": TEXT_IO["outputs"]}, lambda: [{"speech": [0.1, 0.2, 0.3]}], 0,
        {"text": "a"}),
    "output bare array and pair (resampled)": infer(
        {"inputs": TEXT_IO["inputs"], "outputs": {"a": {"kind": "audio"}, "b": {"kind": "audio"}}},
        lambda: [{"text": "t"}], 0, {"a": tone(), "b": (8000, tone())}),
    "output bare array, model fixes no rate": infer(
        {"inputs": TEXT_IO["inputs"], "outputs": {"a": {"kind": "audio"}}}, lambda: [{"text": "t"}], 0,
        {"a": tone()}, model=SimpleNamespace(sample_rate=None)),
    "segments": infer(
        {"inputs": TEXT_IO["inputs"], "outputs": {"segments": {"kind": "segments"}}}, lambda: [{"text": "t"}], 0,
        {"segments": [{"text": "hi", "start": 0.0, "end": 0.4, "score": 0.9}]}),
    "segments refused": infer(
        {"inputs": TEXT_IO["inputs"], "outputs": {"segments": {"kind": "segments"}}}, lambda: [{"text": "t"}], 0,
        {"segments": [(0.0, 0.4)]}),
    "number refuses a bool": infer(
        {"inputs": TEXT_IO["inputs"], "outputs": {"n": {"kind": "number"}}}, lambda: [{"text": "t"}], 0,
        {"n": np.bool_(True)}),
    "text returned as int": infer(TEXT_IO, lambda: [{"text": "t"}], 0, {"text": 3}),
    "undeclared output": infer(TEXT_IO, lambda: [{"text": "t"}], 0, {"text": "a", "extra": 1}),
    "missing output": infer(TEXT_IO, lambda: [{"text": "t"}], 0, {}),
    "reserved idx_key": infer(TEXT_IO, lambda: [{"text": "t"}], 0, {"text": "a"}, idx_key="text"),
    "result not a mapping": infer(TEXT_IO, lambda: [{"text": "t"}], 0, "a"),
    "batch count mismatch": infer(TEXT_IO, lambda: [{"text": "t"}, {"text": "u"}], [0, 1], [{"text": "a"}]),
    "dict of lists for one index": infer(TEXT_IO, lambda: [{"text": "t"}], 0, {"text": ["a"]}),
}


@pytest.mark.parametrize("case", CASES)
def test_contract_path_matches_espnet3(impls, case):
    same(impls, CASES[case])


def test_audio_read_from_a_path_matches_espnet3(impls, tmp_path):
    soundfile = pytest.importorskip("soundfile")
    path = tmp_path / "utt.wav"
    soundfile.write(str(path), stereo_int16(800), 8000)
    configs = ({"kind": "audio"}, {"kind": "audio", "rate_policy": "reject"}, {"kind": "audio", "sample_rate": 8000})
    for config in configs:
        same(impls, infer({"inputs": {"speech": config}, "outputs": TEXT_IO["outputs"]},
                          lambda: [{"speech": path}, {"speech": str(path)}], [0, 1], [{"text": "a"}, {"text": "b"}]))


BAD_CONFIGS = {
    "not a mapping": ["inputs"],
    "unknown section": {**TEXT_IO, "extra": 1},
    "unknown option": {"inputs": {"text": {"kind": "text", "bogus": 1}}, "outputs": TEXT_IO["outputs"]},
    "unknown normalizer": {"inputs": {"text": {"kind": "text", "normalize": ["first_channel"]}},
                           "outputs": TEXT_IO["outputs"]},
    "normalize not names": {"inputs": {"text": {"kind": "text", "normalize": [1]}}, "outputs": TEXT_IO["outputs"]},
    "bad sample_rate": {"inputs": {"s": {"kind": "audio", "sample_rate": 16000.0}}, "outputs": TEXT_IO["outputs"]},
    "bad rate_policy": {"inputs": {"s": {"kind": "audio", "rate_policy": "keep"}}, "outputs": TEXT_IO["outputs"]},
    "no kind": {"inputs": {"text": {}}, "outputs": TEXT_IO["outputs"]},
    "unknown kind": {"inputs": {"text": {"kind": "video"}}, "outputs": TEXT_IO["outputs"]},
    "bad name": {"inputs": {"2text": {"kind": "text"}}, "outputs": TEXT_IO["outputs"]},
    "channels 0": {"inputs": {"s": {"kind": "audio", "channels": 0}}, "outputs": TEXT_IO["outputs"]},
    "entry not a mapping": {"inputs": {"text": "text"}, "outputs": TEXT_IO["outputs"]},
    "empty outputs": {"inputs": TEXT_IO["inputs"], "outputs": {}},
    "optional output": {"inputs": TEXT_IO["inputs"], "outputs": {"t": {"kind": "text", "optional": True}}},
    "imports a string": {**TEXT_IO, "imports": "recipe_x"},
    "imports an empty name": {**TEXT_IO, "imports": ["recipe_x", ""]},
    "imports a missing module": {**TEXT_IO, "imports": ["recipe_absent_module"]},
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_config_errors_match_espnet3(impls, case):
    error = same(impls, lambda m: m.inference.load_inference_contract(BAD_CONFIGS[case]))
    assert isinstance(error, Exception), "every BAD_CONFIGS entry must be refused by ESPnet3"


def test_load_details_and_untrusted_imports_match_espnet3(impls):
    config = {"inputs": {"speech": {"kind": "audio", "sample_rate": 16000, "channels": 1, "label": "Mic"},
                         "prompt": {"kind": "text", "optional": True}},
              "outputs": {"text": {"kind": "text", "normalize": ["strip"]}}}

    def describe(m):
        contract = m.inference.load_inference_contract(config)
        return [(s.name, s.kind, s.label, s.optional, s.channels, dict(s.options))
                for s in contract.inputs + contract.outputs], contract.imports

    same(impls, describe)
    same(impls, lambda m: m.inference.load_inference_contract({**TEXT_IO, "imports": ["os"]}, allow_imports=False))
    same(impls, lambda m: m.inference.load_inference_contract(None))
    same(impls, lambda m: m.inference.resolve_inference_contract(None))
    same(impls, lambda m: m.inference.resolve_inference_contract("contract.yaml"))


@pytest.mark.parametrize("input_key", [None, "speech", ["prompt", "speech"], ["speech", "speech", "prompt"],
                                       ["speech", "text"]])
def test_validate_input_keys_matches_espnet3(impls, input_key):
    config = {"inputs": {"speech": {"kind": "audio"}, "prompt": {"kind": "text", "optional": True}},
              "outputs": TEXT_IO["outputs"]}
    same(impls, lambda m: m.inference.load_inference_contract(config).validate_input_keys(input_key))


def test_imports_register_a_normalizer_as_in_espnet3(impls, tmp_path, monkeypatch):
    """The recipe module is the user's, switched in its import line; both register ``recipe_diff_shout``."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    raw = {"imports": ["recipe_diff"], "inputs": TEXT_IO["inputs"],
           "outputs": {"text": {"kind": "text", "normalize": ["strip", "recipe_diff_shout"]}}}

    def run(m):
        root = tmp_path / m.prefix
        root.mkdir()
        toys.write_contract_module(root, "recipe_diff", prefix=m.prefix)
        sys.modules.pop("recipe_diff", None)
        try:
            contract = m.inference.resolve_inference_contract(raw, str(root))
            return contract.imports, m.inference.validate_inference_outputs(
                {"text": " hi "}, 0, contract, None, {0: {}}, "utt_id")
        finally:
            sys.modules.pop("recipe_diff", None)

    assert same(impls, run) == (("recipe_diff",), {"text": "HI!", "utt_id": "0"})


def test_registries_and_declarations_match_espnet3(impls):
    def registries(m):
        messages = toys.contract_kind_class(m.kinds.Kind)()
        m.root.register_kind("messages", messages)
        m.root.register_normalizer("reverse", lambda turns: turns[::-1])
        spec = m.Field("chat_log", "messages", options={"normalize": "reverse"})
        checked = messages.apply(["a", "b"], spec, None, spec.options, output=False)
        return spec.label, checked, messages.is_batch([["a"]], spec, None), messages.accepts("a", spec)

    same(impls, registries)
    for bad in (lambda m: m.root.register_kind("text", m.kinds.TextKind()),
                lambda m: m.root.register_kind("x", object()),
                lambda m: m.root.register_normalizer("x", "upper"),
                lambda m: m.kinds.TextKind().join(*"ab"),
                lambda m: m.kinds.NumberKind().join(1, 2)):
        same(impls, bad)


@pytest.mark.parametrize("inputs, outputs", [
    ([("a", "text", False)], (("b", "text", False),)),
    ((), (("b", "text", False),)),
    ((("a", "text", False), ("a", "number", False)), (("b", "text", False),)),
    ((("a", "text", True), ("b", "text", False)), (("c", "text", False),)),
    ((("a", "text", False),), (("b", "text", True),)),
    ((("a", "text", False), ("b", "audio", True)), (("c", "text", False),)),
])
def test_check_declaration_matches_espnet3(impls, inputs, outputs):
    def check(m):
        build = lambda specs: type(specs)(m.Field(n, k, optional=o) for n, k, o in specs)  # noqa: E731
        return m.root.check_declaration(type("Decl", (), {"inputs": build(inputs), "outputs": build(outputs)}))

    same(impls, check)


AUDIO_CALLS = {
    "short stereo stays channels first": lambda m: m.Audio(np.zeros((2, 1)), 8000),
    "one column is mono": lambda m: m.Audio(np.ones((5, 1), np.int32), 8000),
    "complex refused": lambda m: m.Audio(np.zeros(3, complex), 8000),
    "rate 0 refused": lambda m: m.Audio(np.zeros(3), 0),
    "float rate truncated": lambda m: m.Audio(np.zeros(3), 8000.7),
    "mono, multichannel, duration": lambda m: (m.Audio(stereo_int16(), 16000).mono(1),
                                               m.Audio(tone(), 8000).multichannel().array.shape,
                                               m.Audio(stereo_int16(), 16000).duration),
    "concat": lambda m: m.Audio.concat([m.Audio(tone(), 8000), m.Audio(tone(), 8000).multichannel()]),
    "concat at two rates": lambda m: m.Audio.concat([m.Audio(tone(), 8000), m.Audio(tone(), 16000)]),
    "concat of 1 and 2 channels": lambda m: m.Audio.concat([m.Audio(tone(), 8), m.Audio(stereo_int16(), 8)]),
    "resample stereo": lambda m: m.Audio(stereo_int16(), 16000).resample(22050),
    "coerce torch tensor": lambda m: m.Audio.coerce(__import__("torch").ones(2, 300), 16000),
    "coerce pair with numpy rate": lambda m: m.Audio.coerce((np.int64(8000), tone()), None),
    "coerce bare array without rate": lambda m: m.Audio.coerce(tone(), None),
    "coerce a dict": lambda m: m.Audio.coerce({"rate": 1}, 16000),
    "demo output": lambda m: m.kinds.AudioKind().to_demo_output(m.Audio(stereo_int16(), 16000)),
    "accepts": lambda m: [m.kinds.AudioKind().accepts(v, m.Field("s", "audio"))
                          for v in (tone(), (8000, tone()), "a.wav", 42, [0.1], [np.int8(3), tone()])],
    "is_batch": lambda m: [m.kinds.AudioKind().is_batch(v, m.Field("s", "audio"), AT_16K)
                           for v in ([tone(), tone()], [16000, tone()], tone())],
    "mean_channels of mono": lambda m: m.kinds.AudioKind().apply(
        tone(), m.Field("s", "audio"), AT_16K, {"normalize": "mean_channels"}, output=True),
}


@pytest.mark.parametrize("case", AUDIO_CALLS)
def test_audio_matches_espnet3(impls, case):
    same(impls, AUDIO_CALLS[case])
