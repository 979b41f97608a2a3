"""Built-in example workloads (the only part of the package that imports torch).

``tone_asr``: a synthetic, fully offline speech recognition task with a
constructed (not trained) CTC model; see :mod:`espnet3_rules.examples.tone_asr`.
"""
