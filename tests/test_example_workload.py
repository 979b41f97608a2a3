"""The built-in tone ASR workload: data prep, dataset, model, decode/feats/stats jobs."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

import jiwer
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from espnet3_rules import ContractError, InferenceRunner  # noqa: E402
from espnet3_rules.cli.main import main as cli_main  # noqa: E402
from espnet3_rules.examples.tone_asr import (  # noqa: E402
    STATS_NAME,
    CollectStatsRunner,
    FeatureSums,
    KaldiDataset,
    ToneASRProvider,
    prepare_data,
)
from espnet3_rules.examples.tone_asr import data as tone_data  # noqa: E402
from espnet3_rules.examples.tone_asr.__main__ import main as prep_main  # noqa: E402
from espnet3_rules.examples.tone_asr.alphabet import VOCABULARY  # noqa: E402
from espnet3_rules.examples.tone_asr.model import ToneCTCModel  # noqa: E402

OUTPUT_FN = "espnet3_rules.examples.tone_asr.output_fn"

# The job entries handed to config/config.yaml ({data} and {out} filled in by the test).
JOBS_YAML = """
jobs:
  tone_decode:
    runner: espnet3_rules.InferenceRunner
    provider: espnet3_rules.examples.tone_asr.ToneASRProvider
    provider_config: {{data_dir: {data}}}
    params: {{device: cpu}}
    runner_kwargs:
      input_key: speech
      output_fn: espnet3_rules.examples.tone_asr.output_fn
    n_shards: 3
    batch_size: 4
    output_dir: {out}/decode
    inputs: [{data}/wav.scp, {data}/text]
  tone_feats:
    runner: espnet3_rules.InferenceRunner
    provider: espnet3_rules.examples.tone_asr.ToneASRProvider
    provider_config: {{data_dir: {data}}}
    params: {{device: cpu}}
    runner_kwargs:
      input_key: speech
      output_fn: espnet3_rules.examples.tone_asr.output_fn
      model_kwargs: {{output: feats}}
    n_shards: 2
    batch_size: 4
    output_dir: {out}/feats
    inputs: [{data}/wav.scp]
  tone_stats:
    runner: espnet3_rules.examples.tone_asr.CollectStatsRunner
    provider: espnet3_rules.examples.tone_asr.ToneASRProvider
    provider_config: {{data_dir: {data}}}
    params: {{device: cpu}}
    runner_kwargs: {{input_key: speech}}
    n_shards: 3
    batch_size: 4
    output_dir: {out}/stats
    inputs: [{data}/wav.scp]
"""


def read_scp(path: Path) -> dict:
    """``<id> <value>`` lines as a dict (the value may be empty)."""
    rows = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(" ")
        rows[key] = value
    return rows


def dir_bytes(root: Path) -> dict:
    """Relative path -> bytes of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def word_error_rate(refs: dict, hyps: dict) -> float:
    keys = sorted(refs)
    return jiwer.wer([refs[k] for k in keys], [hyps[k] for k in keys])


@pytest.fixture(scope="module")
def noisy_dir(tmp_path_factory) -> Path:
    """The default test set: 40 utterances, seed 0, SNR -5..15 dB."""
    return prepare_data(tmp_path_factory.mktemp("data") / "noisy")


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    return prepare_data(tmp_path_factory.mktemp("data") / "clean", n_utts=24, seed=1, snr_db=(30, 30))


@pytest.fixture(scope="module")
def model() -> ToneCTCModel:
    return ToneCTCModel()


def provider(data_dir: Path, **params) -> ToneASRProvider:
    from omegaconf import OmegaConf

    return ToneASRProvider(OmegaConf.create({"data_dir": str(data_dir)}), params={"device": "cpu", **params})


def reference_stats(data_dir: Path, model: ToneCTCModel) -> dict:
    """Single-process stats: every utterance featurised alone, one float64 matrix, numpy reductions."""
    dataset = KaldiDataset(data_dir)
    feats = np.concatenate([model(dataset[i]["speech"], output="feats")["feats"] for i in range(len(dataset))])
    feats = feats.astype(np.float64)
    return {
        "count": len(feats),
        "sum": feats.sum(axis=0),
        "sum_square": np.square(feats).sum(axis=0),
        "mean": feats.mean(axis=0),
        "var": feats.var(axis=0),
    }


# ------------------------------------------------------------------ data prep
def test_prepare_is_deterministic_and_prefix_stable(tmp_path):
    first = dir_bytes(prepare_data(tmp_path / "a", n_utts=6, seed=7))
    again = dir_bytes(prepare_data(tmp_path / "a", n_utts=6, seed=7))  # regenerated in place
    assert first == again
    other_seed = dir_bytes(prepare_data(tmp_path / "b", n_utts=6, seed=8))
    assert other_seed["text"] != first["text"]
    smaller = dir_bytes(prepare_data(tmp_path / "c", n_utts=3, seed=7))
    wavs = {k: v for k, v in smaller.items() if k.endswith(".wav")}
    assert len(wavs) == 3 and all(first[k] == v for k, v in wavs.items())


def test_prepare_writes_a_consistent_kaldi_dir(noisy_dir):
    wav_scp, text, utt2spk = (read_scp(noisy_dir / n) for n in ("wav.scp", "text", "utt2spk"))
    ids = [line.split(" ", 1)[0] for line in (noisy_dir / "wav.scp").read_text().splitlines()]
    assert len(ids) == 40 and ids == sorted(ids)
    assert set(text) == set(utt2spk) == set(ids)
    spk2utt = {spk: utts.split() for spk, utts in read_scp(noisy_dir / "spk2utt").items()}
    assert sorted(u for utts in spk2utt.values() for u in utts) == ids
    for utt_id in ids:
        assert utt_id.startswith(utt2spk[utt_id] + "_")
        assert 3 <= len(text[utt_id].split()) <= 8 and set(text[utt_id].split()) <= set(VOCABULARY)
        assert Path(wav_scp[utt_id]) == noisy_dir / "wav" / f"{utt_id}.wav"
    with wave.open(wav_scp[ids[0]]) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 16000)
        assert 1.0 < f.getnframes() / 16000 < 10.0
    assert not list(noisy_dir.parent.glob(".noisy.*"))


def test_killed_prepare_leaves_previous_set_intact(tmp_path, monkeypatch):
    target = prepare_data(tmp_path / "set", n_utts=4, seed=0)
    before = dir_bytes(target)
    real_write, calls = tone_data.write_wav, []

    def dying_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        real_write(*args, **kwargs)

    monkeypatch.setattr(tone_data, "write_wav", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(tmp_path / "set", n_utts=8, seed=1)
    assert dir_bytes(target) == before
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare_data(tmp_path / "fresh", n_utts=8, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_prepare_removes_what_a_hard_killed_run_left(tmp_path):
    for stale in (tmp_path / ".set.tmp.999999", tmp_path / ".set.old.999999"):
        (stale / "wav").mkdir(parents=True)
        (stale / "wav.scp").write_text("half\n")
    prepare_data(tmp_path / "set", n_utts=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_prepare_refuses_bad_options(tmp_path):
    with pytest.raises(ContractError, match="unknown options.*n_utterances"):
        prepare_data(tmp_path / "x", n_utterances=3)
    with pytest.raises(ContractError, match="snr_db range .* reversed"):
        prepare_data(tmp_path / "x", snr_db=(10, 0))
    with pytest.raises(ContractError, match="min_words"):
        prepare_data(tmp_path / "x", min_words=5, max_words=2)
    assert not (tmp_path / "x").exists()


def test_prepare_cli(tmp_path, capsys):
    argv = ["prepare", "--out", str(tmp_path / "d"), "--n-utts", "5", "--seed", "3", "--snr-db", "0", "10"]
    assert prep_main(argv) == 0
    assert "5 utterances" in capsys.readouterr().out
    assert dir_bytes(tmp_path / "d") == dir_bytes(prepare_data(tmp_path / "d", n_utts=5, seed=3, snr_db=(0, 10)))
    assert prep_main(["prepare", "--out", str(tmp_path / "e"), "--n-utts", "0"]) == 2


def test_data_prep_does_not_import_torch():
    code = "import sys, espnet3_rules.examples.tone_asr; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# -------------------------------------------------------------------- dataset
def test_dataset_reads_items_lazily(noisy_dir):
    dataset = KaldiDataset(noisy_dir)
    text = read_scp(noisy_dir / "text")
    assert len(dataset) == 40
    item = dataset[5]
    assert set(item) == {"utt_id", "speech", "text"}
    assert item["text"] == text[item["utt_id"]]
    assert item["speech"].dtype == np.float32 and item["speech"].ndim == 1
    with wave.open(str(noisy_dir / "wav" / f"{item['utt_id']}.wav")) as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    np.testing.assert_array_equal(item["speech"], pcm / 32768.0)
    assert 0.01 < np.abs(item["speech"]).max() <= 0.95


def test_dataset_errors_name_the_file(tmp_path, noisy_dir):
    with pytest.raises(FileNotFoundError, match="wav.scp"):
        KaldiDataset(tmp_path)
    (tmp_path / "wav.scp").write_text("u1 /x.wav\nu2 /y.wav\n")
    (tmp_path / "text").write_text("u1 YES\n")
    with pytest.raises(ContractError, match="text lacks 1 utterances.*u2"):
        KaldiDataset(tmp_path)
    with pytest.raises(ContractError, match=r"sample rate 16000 Hz, the model expects 8000"):
        KaldiDataset(noisy_dir, sample_rate=8000)[0]


# ---------------------------------------------------------------------- model
def test_clean_audio_is_recognised_exactly(clean_dir, model):
    dataset = KaldiDataset(clean_dir)
    items = [dataset[i] for i in range(len(dataset))]
    outputs = model([item["speech"] for item in items])
    assert [o["hyp"] for o in outputs] == [item["text"] for item in items]
    assert all(o["score"] <= 0 for o in outputs)


def test_noisy_audio_has_a_small_nonzero_wer(noisy_dir, model):
    dataset = KaldiDataset(noisy_dir)
    refs = {dataset[i]["utt_id"]: dataset[i]["text"] for i in range(len(dataset))}
    hyps = {dataset[i]["utt_id"]: model(dataset[i]["speech"])["hyp"] for i in range(len(dataset))}
    assert 0.0 < word_error_rate(refs, hyps) < 0.06


def test_random_audio_is_not_recognised_as_words(model):
    noise = np.random.default_rng(0).normal(0, 0.1, 48000).astype(np.float32)
    assert model(noise)["hyp"] == ""
    assert model(np.zeros(16000, dtype=np.float32))["hyp"] == ""


def test_batching_and_padding_do_not_change_results(noisy_dir, model):
    dataset = KaldiDataset(noisy_dir)
    speech = [dataset[i]["speech"] for i in range(6)]
    alone = [model(s) for s in speech]
    assert [o["hyp"] for o in model(speech)] == [o["hyp"] for o in alone]
    np.testing.assert_allclose([o["score"] for o in model(speech)], [o["score"] for o in alone], rtol=1e-4)
    feats = model(speech, output="feats")
    for s, f in zip(speech, feats):
        assert f["feats"].shape == (1 + len(s) // 160, 80) and f["feats"].dtype == np.float32
        np.testing.assert_allclose(f["feats"], model(s, output="feats")["feats"], rtol=1e-5, atol=1e-4)


def test_padding_frames_never_reach_valid_logits(model):
    """A short input ending in an off-alphabet 6 kHz hum (every letter template scores it negative)."""
    t = np.arange(4800) / 16000
    hum = (0.1 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    longer = np.random.default_rng(1).normal(0, 0.01, 20000).astype(np.float32)
    feats, frames = model.features([hum])
    alone = model.logits(feats, frames)[0]
    feats, frames = model.features([hum, longer])
    batched = model.logits(feats, frames)[0, : len(alone)]
    assert float(alone[-1, 1]) > 0  # a pause (<space>) is detected up to the end
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-4)


def test_model_option_errors():
    with pytest.raises(ContractError, match="output 'logits'"):
        ToneCTCModel()(np.zeros(100, dtype=np.float32), output="logits")
    with pytest.raises(ContractError, match="pause_frames"):
        ToneCTCModel(pause_frames=4)
    if not torch.cuda.is_available():
        with pytest.raises(ContractError, match="device 'cuda'.*is_available"):
            ToneCTCModel(device="cuda")


def test_provider_builds_dataset_and_model(noisy_dir):
    from omegaconf import OmegaConf

    env = provider(noisy_dir).build_env_local()
    assert len(env["dataset"]) == 40 and isinstance(env["model"], ToneCTCModel) and env["device"] == "cpu"
    with pytest.raises(ContractError, match="provider_config.data_dir is required"):
        ToneASRProvider.build_dataset(OmegaConf.create({}))
    with pytest.raises(ContractError, match=r"provider_config.model has unknown keys \['treshold'\]"):
        ToneASRProvider.build_model(OmegaConf.create({"model": {"treshold": 2.0}}))
    tuned = ToneASRProvider.build_model(OmegaConf.create({"model": {"threshold": 9.0, "smoothing": [1.0]}}))
    assert float(tuned.classifier.bias[0]) == -9.0 and tuned.smoothing.tolist() == [1.0]


# ----------------------------------------------------------- runs end to end
def test_decode_job_end_to_end(noisy_dir, tmp_path):
    runner = InferenceRunner(
        provider(noisy_dir), input_key="speech", output_fn=OUTPUT_FN, batch_size=4, n_shards=3, output_dir=tmp_path
    )
    assert runner(range(40)) is True
    assert sorted(p.stem for p in tmp_path.glob("*.scp")) == ["hyp", "ref", "score"]
    hyp_ids = [line.split(" ", 1)[0] for line in (tmp_path / "hyp.scp").read_text().splitlines()]
    assert hyp_ids == [line.split(" ", 1)[0] for line in (noisy_dir / "wav.scp").read_text().splitlines()]
    refs, hyps = read_scp(noisy_dir / "text"), read_scp(tmp_path / "hyp.scp")
    assert read_scp(tmp_path / "ref.scp") == refs
    assert sum(hyps[k] == refs[k] for k in refs) >= 32
    assert word_error_rate(refs, hyps) < 0.06
    assert all(float(v) <= 0 for v in read_scp(tmp_path / "score.scp").values())
    for shard in range(3):
        assert (tmp_path / f"split.{shard}" / "done").exists()


def test_feats_job_writes_arrays(noisy_dir, tmp_path, model):
    runner = InferenceRunner(
        provider(noisy_dir),
        input_key="speech",
        output_fn=OUTPUT_FN,
        model_kwargs={"output": "feats"},
        batch_size=4,
        n_shards=3,
        output_dir=tmp_path,
    )
    assert runner(range(12)) is True
    assert [p.stem for p in tmp_path.glob("*.scp")] == ["feats"]
    feats_scp = read_scp(tmp_path / "feats.scp")
    dataset = KaldiDataset(noisy_dir)
    assert list(feats_scp) == [dataset[i]["utt_id"] for i in range(12)]
    for i in (0, 5, 11):
        path = Path(feats_scp[dataset[i]["utt_id"]])
        assert path.parent.name == "feats" and path.parent.parent.name.startswith("split.")
        expected = model(dataset[i]["speech"], output="feats")["feats"]
        np.testing.assert_allclose(np.load(path), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n_shards,batch_size", [(1, None), (3, 4), (4, 7)])
def test_stats_job_equals_single_process_stats(noisy_dir, tmp_path, model, n_shards, batch_size):
    runner = CollectStatsRunner(provider(noisy_dir), batch_size=batch_size, n_shards=n_shards, output_dir=tmp_path)
    result = runner(range(40))
    expected = reference_stats(noisy_dir, model)
    assert result == {"stats": str(tmp_path / STATS_NAME), "count": expected["count"], "dim": 80}
    for shard in range(n_shards):
        assert (tmp_path / f"split.{shard}" / STATS_NAME).exists()
    with np.load(tmp_path / STATS_NAME) as stats:
        assert int(stats["count"]) == expected["count"]
        for key in ("sum", "sum_square"):
            np.testing.assert_allclose(stats[key], expected[key], rtol=1e-6)
        for key in ("mean", "var"):
            np.testing.assert_allclose(stats[key], expected[key], rtol=1e-6, atol=1e-6)
        assert np.all(stats["var"] > 0.1)


def test_configured_jobs_run_through_the_cli(noisy_dir, tmp_path, model):
    """The YAML job entries (as config/config.yaml carries them) plan, run and merge."""
    config = tmp_path / "config.yaml"
    config.write_text(JOBS_YAML.format(data=noisy_dir, out=tmp_path / "exp"))
    jobs = yaml.safe_load(config.read_text())["jobs"]
    for job, spec in jobs.items():
        assert cli_main(["plan", "--config", str(config), "--job", job]) == 0
        for shard in range(spec["n_shards"]):
            assert cli_main(["run-shard", "--config", str(config), "--job", job, "--shard", str(shard)]) == 0
        assert cli_main(["merge", "--config", str(config), "--job", job]) == 0
    exp = tmp_path / "exp"
    assert word_error_rate(read_scp(noisy_dir / "text"), read_scp(exp / "decode" / "hyp.scp")) < 0.06
    assert len(read_scp(exp / "feats" / "feats.scp")) == 40
    with np.load(exp / "stats" / STATS_NAME) as stats:
        # The stats job describes exactly the features the feats job wrote.
        written = FeatureSums.of(np.load(p) for p in read_scp(exp / "feats" / "feats.scp").values())
        assert int(stats["count"]) == written.count
        np.testing.assert_allclose(stats["mean"], written.mean_var()[0], rtol=1e-6, atol=1e-6)
