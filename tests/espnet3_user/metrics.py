"""An ESPnet3 metric and test-set provider as a recipe writes them, for ``measure`` (ESPnet3's and ours).

:class:`LengthRatio` keeps ``sum`` and ``cat`` states, reads two chunks per test set
(``chunk_size`` 2) and writes an artifact; :class:`TranscriptProvider` gives each test set's
transcripts through ``build_dataset(config)``, as ``measure`` reads ``dataset:text``.
"""

from espnet3.components.metrics.base_metric import BaseMetric
from espnet3.contract import Field
from espnet3.systems.base.inference_provider import InferenceProvider

#: Per test set, ``(utt_id, reference, hypothesis)``.
UTTERANCES = {
    "dev": [("d1", "the cat sat", "the cat sat"), ("d2", "a naïve café", "a naive café"), ("d3", "go now", "")],
    "eval": [("e1", "hello big world", "hello world"), ("e2", "one two", "one too two")],
}


class LengthRatio(BaseMetric):
    """Hypothesis words per reference word, and the number of utterances; one line per utterance as an artifact."""

    inputs = (Field("ref", "text"), Field("hyp", "text"))
    outputs = (Field("ratio", "number"), Field("utts", "number"))
    chunk_size = 2

    def __init__(self, precision=3):
        super().__init__()
        self.precision = precision
        self.add_state("ref_words", 0, "sum")
        self.add_state("hyp_words", 0, "sum")
        self.add_state("lines", [], "cat")

    def update(self, *, ref, hyp):
        for r, h in zip(ref, hyp):
            self.ref_words += len(r.split())
            self.hyp_words += len(h.split())
            if self.collect_artifacts:
                self.lines.append(f"{len(h.split())}/{len(r.split())} {h}")

    def compute(self):
        return {"ratio": round(self.hyp_words / self.ref_words, self.precision), "utts": len(self.lines)}

    def write_artifacts(self, test_dir):
        (test_dir / "length_ratio.txt").write_text("\n".join(self.lines) + "\n", encoding="utf-8")


class TranscriptProvider(InferenceProvider):
    """``build_dataset``: the references of ``config.test_set``."""

    @staticmethod
    def build_dataset(config):
        return [{"utt_id": utt_id, "text": ref} for utt_id, ref, _ in UTTERANCES[config.test_set]]

    @staticmethod
    def build_model(config):
        raise NotImplementedError("measure builds no model")


def write_inference_dir(inference_dir):
    """What ``infer`` would have written: ``<test>/hyp.scp`` per test set."""
    for test, rows in UTTERANCES.items():
        (inference_dir / test).mkdir(parents=True)
        lines = "".join(f"{utt_id} {hyp}\n" for utt_id, _, hyp in rows)
        (inference_dir / test / "hyp.scp").write_text(lines, encoding="utf-8")
