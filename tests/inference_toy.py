"""Importable fixtures for the InferenceRunner and metrics tests (providers, models, output_fns, writers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from espnet3_rules import InferenceProvider


def make_items(n: int) -> List[Dict[str, Any]]:
    """``n`` utterances: id, a float waveform of 4*(i+1) samples, a transcript."""
    return [
        {
            "utt_id": f"utt{i}",
            "speech": np.linspace(-0.5, 0.5, 4 * (i + 1), dtype=np.float32),
            "text": f"word{i} text",
        }
        for i in range(n)
    ]


class EchoModel:
    """Plain model: ``model(speech=, text=, scale=)`` for one item or lists of items."""

    def __call__(self, speech: Any, text: Any = None, scale: float = 1.0) -> Any:
        if isinstance(speech, list):
            return [self(s, t, scale) for s, t in zip(speech, text or [None] * len(speech))]
        return {"n": int(len(speech)), "feats": np.asarray(speech) * scale, "text": text}


class ToyProvider(InferenceProvider):
    """Dataset of ``config.n`` items; ``config.model`` picks the model class in this module."""

    @staticmethod
    def build_dataset(config: Any) -> Any:
        return make_items(int(config["n"]))

    @staticmethod
    def build_model(config: Any) -> Any:
        return globals()[config.get("model", "EchoModel")]()


def output_fn(data: Any, model_output: Any, idx: Any) -> Any:
    """Result dicts with every kind of value the runner writes."""
    if isinstance(idx, list):
        return [output_fn(d, o, i) for d, o, i in zip(data, model_output, idx)]
    return {
        "utt_id": data["utt_id"],
        "hyp": model_output["text"].upper(),
        "n": np.int64(model_output["n"]),
        "feats": model_output["feats"],
        "meta": {"idx": idx, "text": data["text"]},
    }


def output_fn_nested(data: Any, model_output: Any, idx: Any) -> Any:
    """Each item as a nested list ``[[record]]`` (flattened by the runner)."""
    return [[{"utt_id": d["utt_id"], "hyp": o["text"]}] for d, o in zip(data, model_output)]


def output_fn_sparse(data: Any, model_output: Any, idx: Any) -> Any:
    """Only even items have an ``extra`` field: fields differ between shards."""
    record = {"utt_id": data["utt_id"], "hyp": model_output["text"]}
    if idx % 2 == 0:
        record["extra"] = f"e{idx}"
    return record


def text_writer(value: Any, path: Path, suffix: str = ".txt") -> Path:
    """Custom artifact writer: the array's values, one per line."""
    out = Path(f"{path}{suffix}")
    out.write_text("\n".join(f"{v:.3f}" for v in np.asarray(value).ravel()) + "\n", encoding="utf-8")
    return out


def bad_writer(value: Any, path: Path) -> Any:
    """A writer that writes nothing and says so wrongly."""
    return f"{path}.missing"


class NoBatchModel:
    """Accepts one item only (a list raises TypeError), and counts calls."""

    calls = 0

    def __call__(self, speech: Any) -> Any:
        type(self).calls += 1
        if isinstance(speech, list):
            raise TypeError("expected an array, got a list")
        return {"n": int(len(speech))}


class OOMModel:
    """Runs out of memory on any batch of more than one item."""

    error: Any = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def __call__(self, speech: Any) -> Any:
        if isinstance(speech, list) and len(speech) > 1:
            raise self.error
        return {"n": 1}


class FailsOnLongModel:
    """Fails for batches, and for any single item longer than 8 samples."""

    def __call__(self, speech: Any) -> Any:
        if isinstance(speech, list):
            raise ValueError("no batches")
        if len(speech) > 8:
            raise ValueError(f"too long: {len(speech)}")
        return {"n": int(len(speech))}


def id_output_fn(data: Any, model_output: Any, idx: Any) -> Any:
    """Adds the id to model outputs (single or batched)."""
    if isinstance(idx, list):
        return [id_output_fn(d, o, i) for d, o, i in zip(data, model_output, idx)]
    return {"utt_id": data["utt_id"], **model_output}


def asr_output_fn(data: Any, model_output: Any, idx: Any) -> Any:
    """A "recognizer": the transcript, with the last word dropped for odd items."""
    words = data["text"].split()
    return {"utt_id": data["utt_id"], "hyp": " ".join(words[:-1] if idx % 2 else words)}
