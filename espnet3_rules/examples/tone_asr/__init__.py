"""Tone ASR: a synthetic speech recognition task with a constructed CTC model.

Fully offline and deterministic: :func:`prepare_data` synthesises a Kaldi-style
test set of spelled Speech Commands words (letters are dual-tone chords, with
per-speaker pitch, rate and loudness, and white noise), and
:class:`ToneASRProvider` decodes it with a log-mel + template-classifier + CTC
model whose weights come from the alphabet's tone frequencies, not training.

Import paths for job configs:

- ``espnet3_rules.examples.tone_asr.ToneASRProvider`` (provider)
- ``espnet3_rules.examples.tone_asr.output_fn`` (InferenceRunner ``output_fn``)
- ``espnet3_rules.examples.tone_asr.CollectStatsRunner`` (runner of the stats job)

Data preparation: ``python -m espnet3_rules.examples.tone_asr prepare --out DIR``.
Importing this package does not import torch; building the model does.
"""

from .data import KaldiDataset, PrepConfig, prepare_data
from .provider import ToneASRProvider, output_fn
from .stats import STATS_NAME, CollectStatsRunner, FeatureSums

__all__ = [
    "STATS_NAME",
    "CollectStatsRunner",
    "FeatureSums",
    "KaldiDataset",
    "PrepConfig",
    "ToneASRProvider",
    "output_fn",
    "prepare_data",
]
