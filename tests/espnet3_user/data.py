"""The toy dataset and "model" of the reference tests: generated, deterministic, no ESPnet3 imports."""

from typing import Any, Dict, List, Sequence, Union

VOCAB = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "müller")


def make_items(n_items: int, seed: int = 0) -> List[Dict[str, Any]]:
    """``n_items`` dicts ``{"utt_id", "text", "number"}``; item i depends only on ``seed`` and i."""
    items = []
    for i in range(n_items):
        words = [VOCAB[(seed * 5 + i * 7 + k * 3) % len(VOCAB)] for k in range(1 + (i + seed) % 4)]
        items.append({"utt_id": f"utt{i:03d}", "text": " ".join(words), "number": (i * 37 + seed) % 101})
    return items


class WordModel:
    """A "model" without weights: reverses the word order and upper-cases, ``joiner`` between words."""

    def __init__(self, joiner: str = " "):
        self.joiner = joiner

    def __call__(self, text: Union[str, Sequence[str]]):
        if isinstance(text, str):
            return self.joiner.join(reversed(text.split())).upper()
        return [self(t) for t in text]


class ScoreModel:
    """The inference toy's backend: ``model(text=..., number=...)`` -> hypothesis, score, length, vector."""

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def _one(self, text: str, number: int) -> Dict[str, Any]:
        import numpy as np

        words = text.split()
        return {
            "hyp": " ".join(w[::-1] for w in words),
            "score": round(self.scale * number / 7.0, 6),
            "n_words": len(words),
            "vec": np.arange(len(words) + 1, dtype=np.float32) * self.scale + number,
        }

    def __call__(self, text, number):
        if isinstance(text, (list, tuple)):
            return [self._one(t, n) for t, n in zip(text, number)]
        return self._one(text, number)


def format_output(data, model_output, idx):
    """Attach the utterance id (ESPnet3's legacy output_fn contract; one item or a batch)."""
    if isinstance(idx, (list, tuple)):
        return [format_output(d, o, i) for d, o, i in zip(data, model_output, idx)]
    return {"utt_id": data["utt_id"], **model_output}
