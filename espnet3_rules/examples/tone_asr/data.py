"""Synthetic Kaldi-style test sets of spelled words, and a lazy reader for them.

:func:`prepare_data` writes a data directory as a Kaldi/ESPnet recipe expects::

    DIR/wav/<utt_id>.wav   16-bit mono PCM
    DIR/wav.scp            <utt_id> <absolute wav path>
    DIR/text               <utt_id> <reference words>
    DIR/utt2spk, spk2utt   speaker maps
    DIR/meta.json          generation parameters

Each utterance is a random sentence of vocabulary words spoken by one of
``n_speakers`` synthetic speakers (own pitch shift, speaking rate, loudness and
spectral tilt); letters are dual-tone chords (:mod:`.alphabet`) with jittered
durations and loudness, short gaps between letters, longer pauses between
words, and white noise at a per-utterance SNR. Utterance ``i`` depends only on
``(seed, i)``, so a larger set extends a smaller one with the same seed.
"""

from __future__ import annotations

import json
import os
import shutil
import wave
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from espnet3_rules.engine.contracts import ContractError
from .alphabet import LETTER_TONES_HZ, VOCABULARY

SAMPLE_RATE = 16000
_SPEAKER_STREAM, _UTTERANCE_STREAM = 0, 1  # independent random streams under one seed


@dataclass(frozen=True)
class PrepConfig:
    """What a generated test set depends on (written to ``meta.json``)."""

    n_utts: int = 40
    seed: int = 0
    n_speakers: int = 8
    snr_db: Tuple[float, float] = (-5.0, 15.0)
    min_words: int = 3
    max_words: int = 8
    sample_rate: int = SAMPLE_RATE

    def check(self) -> None:
        """Refuse values that cannot produce a test set."""
        if self.n_utts < 1 or self.n_speakers < 1:
            raise ContractError(f"n_utts ({self.n_utts}) and n_speakers ({self.n_speakers}) must be >= 1")
        if self.seed < 0:
            raise ContractError(f"seed must be >= 0, got {self.seed}")
        if not 1 <= self.min_words <= self.max_words:
            raise ContractError(f"need 1 <= min_words ({self.min_words}) <= max_words ({self.max_words})")
        if self.snr_db[0] > self.snr_db[1]:
            raise ContractError(f"snr_db range {list(self.snr_db)} is reversed; give it as [low, high]")
        top_hz = max(max(pair) for pair in LETTER_TONES_HZ.values()) * 1.1  # with headroom for pitch shifts
        if self.sample_rate < 2 * top_hz:
            raise ContractError(f"sample_rate {self.sample_rate} is too low: tones reach {top_hz:.0f} Hz")


@dataclass(frozen=True)
class Speaker:
    """Voice of one synthetic speaker."""

    pitch: float  # multiplies every tone frequency
    rate: float  # multiplies every duration
    gain: float  # linear amplitude of each tone
    tilt_db: float  # level of the high tone relative to the low one


def make_speaker(seed: int, speaker: int) -> Speaker:
    """The speaker ``speaker`` of the set generated with ``seed``."""
    rng = np.random.default_rng([seed, _SPEAKER_STREAM, speaker])
    return Speaker(
        pitch=float(rng.uniform(0.96, 1.04)),
        rate=float(rng.uniform(0.85, 1.2)),
        gain=float(10 ** (rng.uniform(-20.0, -10.0) / 20)),
        tilt_db=float(rng.uniform(-4.0, 4.0)),
    )


def _ramp_envelope(n: int, ramp: int) -> np.ndarray:
    """Flat envelope with raised-cosine attack and release (no clicks)."""
    env = np.ones(n)
    ramp = min(ramp, n // 2)
    if ramp:
        rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        env[:ramp] = rise
        env[n - ramp :] = rise[::-1]
    return env


def synthesize(
    words: Sequence[str], speaker: Speaker, snr_db: float, rng: np.random.Generator, sample_rate: int
) -> np.ndarray:
    """Render ``words`` as a float waveform: chords, gaps, pauses, then noise at ``snr_db``.

    The SNR is measured against the power of the voiced (chord) samples.
    """
    pieces: List[np.ndarray] = []
    voiced: List[np.ndarray] = []

    def add(samples: np.ndarray, is_voiced: bool) -> None:
        pieces.append(samples)
        voiced.append(np.full(len(samples), is_voiced))

    def samples(low_s: float, high_s: float) -> int:
        return int(round(rng.uniform(low_s, high_s) * speaker.rate * sample_rate))

    add(np.zeros(samples(0.1, 0.3)), False)
    for w, word in enumerate(words):
        if w:
            add(np.zeros(samples(0.25, 0.4)), False)  # pause between words
        for li, letter in enumerate(word):
            if li:
                add(np.zeros(samples(0.05, 0.075)), False)  # gap between letters
            n = samples(0.07, 0.12)
            t = np.arange(n) / sample_rate
            low, high = (f * speaker.pitch for f in LETTER_TONES_HZ[letter])
            phases = rng.uniform(0, 2 * np.pi, size=2)
            chord = np.sin(2 * np.pi * low * t + phases[0])
            chord += 10 ** (speaker.tilt_db / 20) * np.sin(2 * np.pi * high * t + phases[1])
            level = speaker.gain * 10 ** (rng.uniform(-3.0, 3.0) / 20)
            add(level * chord * _ramp_envelope(n, int(0.005 * sample_rate)), True)
    add(np.zeros(samples(0.1, 0.3)), False)
    clean, is_voiced = np.concatenate(pieces), np.concatenate(voiced)
    noise_power = np.mean(clean[is_voiced] ** 2) / 10 ** (snr_db / 10)
    return clean + rng.normal(0.0, np.sqrt(noise_power), size=len(clean))


def to_pcm16(signal: np.ndarray, peak: float = 0.95) -> np.ndarray:
    """Scale down if louder than ``peak`` full scale, then quantise to little-endian int16."""
    top = float(np.max(np.abs(signal))) if len(signal) else 0.0
    if top > peak:
        signal = signal * (peak / top)
    return np.round(signal * 32767).astype("<i2")


def make_utterance(config: PrepConfig, index: int) -> Dict[str, Any]:
    """Utterance ``index`` of the set: id, speaker, words, int16 samples."""
    rng = np.random.default_rng([config.seed, _UTTERANCE_STREAM, index])
    speaker = int(rng.integers(config.n_speakers))
    words = [str(w) for w in rng.choice(VOCABULARY, size=int(rng.integers(config.min_words, config.max_words + 1)))]
    snr_db = float(rng.uniform(*config.snr_db))
    signal = synthesize(words, make_speaker(config.seed, speaker), snr_db, rng, config.sample_rate)
    spk_id = f"spk{speaker:03d}"
    return {"utt_id": f"{spk_id}_utt{index:06d}", "spk_id": spk_id, "words": words, "pcm": to_pcm16(signal)}


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Write 16-bit mono PCM with the stdlib ``wave`` module."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(np.ascontiguousarray(pcm, dtype="<i2").tobytes())


def _write_lines(path: Path, rows: Sequence[Tuple[str, str]]) -> None:
    path.write_text("".join(f"{key} {value}\n" for key, value in rows), encoding="utf-8")


def _write_set(tmp: Path, final: Path, config: PrepConfig) -> None:
    """Write every file of the set into ``tmp``; wav.scp already points at ``final``."""
    (tmp / "wav").mkdir(parents=True)
    wav_scp, text, utt2spk, spk2utt = [], [], [], {}
    for index in range(config.n_utts):
        utt = make_utterance(config, index)
        write_wav(tmp / "wav" / f"{utt['utt_id']}.wav", utt["pcm"], config.sample_rate)
        wav_scp.append((utt["utt_id"], (final / "wav" / f"{utt['utt_id']}.wav").as_posix()))
        text.append((utt["utt_id"], " ".join(utt["words"])))
        utt2spk.append((utt["utt_id"], utt["spk_id"]))
        spk2utt.setdefault(utt["spk_id"], []).append(utt["utt_id"])
    for name, rows in (("wav.scp", wav_scp), ("text", text), ("utt2spk", utt2spk)):
        _write_lines(tmp / name, sorted(rows))  # Kaldi files are sorted by utterance id
    _write_lines(tmp / "spk2utt", sorted((spk, " ".join(sorted(utts))) for spk, utts in spk2utt.items()))
    meta = {**asdict(config), "snr_db": list(config.snr_db), "vocabulary": list(VOCABULARY)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def prepare_data(out_dir: Any, **options: Any) -> Path:
    """Generate a test set into ``out_dir`` (options: :class:`PrepConfig` fields); return its path.

    The set is built in a hidden sibling directory and renamed into place, so
    ``out_dir`` is either absent, the previous complete set, or the new complete
    set: a killed run never leaves a half-written data directory.
    """
    unknown = sorted(set(options) - set(PrepConfig.__dataclass_fields__))
    if unknown:
        known = sorted(PrepConfig.__dataclass_fields__)
        raise ContractError(f"prepare_data got unknown options {unknown}; known: {known}")
    if "snr_db" in options:
        options["snr_db"] = tuple(float(v) for v in options["snr_db"])
    config = PrepConfig(**options)
    config.check()
    final = Path(out_dir).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "old"):  # left by a killed run
        for stale in final.parent.glob(f".{final.name}.{kind}.*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp.{os.getpid()}")
    try:
        _write_set(tmp, final, config)
        if final.exists():
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------ reading
def read_kaldi_map(path: Path) -> List[Tuple[str, str]]:
    """``<key> <value>`` lines of a Kaldi file, in file order (value may contain spaces)."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, _, value = line.partition(" ")
            if not key:
                raise ContractError(f"{path}:{lineno}: line starts with a space; expected '<utt_id> <value>'")
            rows.append((key, value.strip()))
    return rows


def read_wav(path: Any, sample_rate: int) -> np.ndarray:
    """16-bit mono PCM as float32 in [-1, 1); refuses other formats and sample rates."""
    with wave.open(str(path), "rb") as f:
        if f.getnchannels() != 1 or f.getsampwidth() != 2:
            raise ContractError(
                f"{path}: expected 16-bit mono PCM, got {f.getnchannels()} channels x {8 * f.getsampwidth()} bit"
            )
        if f.getframerate() != sample_rate:
            raise ContractError(f"{path}: sample rate {f.getframerate()} Hz, the model expects {sample_rate} Hz")
        data = f.readframes(f.getnframes())
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


class KaldiDataset:
    """Kaldi data dir as a dataset: ``dataset[i] -> {"utt_id", "speech", "text"}``.

    ``wav.scp`` and ``text`` are indexed when the dataset is built; audio is read
    only when an item is requested. Items follow ``wav.scp`` order.
    """

    def __init__(self, data_dir: Any, sample_rate: int = SAMPLE_RATE):
        """Index ``wav.scp`` and ``text`` of ``data_dir``."""
        self.data_dir = Path(data_dir)
        self.sample_rate = int(sample_rate)
        wav_scp, text_path = self.data_dir / "wav.scp", self.data_dir / "text"
        for path in (wav_scp, text_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found; run the data preparation first")
        self.entries = read_kaldi_map(wav_scp)
        for utt_id, location in self.entries:
            if location.endswith("|"):
                raise ContractError(f"{wav_scp}: {utt_id} is a pipe command; only wav file paths are supported")
        self.texts = dict(read_kaldi_map(text_path))
        missing = [utt_id for utt_id, _ in self.entries if utt_id not in self.texts]
        if missing:
            raise ContractError(f"{text_path} lacks {len(missing)} utterances of wav.scp (first: {missing[0]})")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        utt_id, location = self.entries[index]
        return {"utt_id": utt_id, "speech": read_wav(location, self.sample_rate), "text": self.texts[utt_id]}
