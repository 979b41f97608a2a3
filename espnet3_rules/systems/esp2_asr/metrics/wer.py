"""Word error rate (ESPnet3's ``espnet3.systems.esp2_asr.metrics.wer``)."""

from __future__ import annotations

from espnet3_rules.contract import Field
from espnet3_rules.systems.esp2_asr.metrics.error_rate import ErrorRate


class WER(ErrorRate):
    """Corpus WER in percent of reference words: ``{"WER": 12.5}``; writes ``<test>/wer_alignment``.

    Args:
        clean_types: espnet2 ``TextCleaner`` types applied to both texts (``None``: none).
    """

    outputs = (Field("WER", "number"),)
    unit = "words"
    jiwer_process = "process_words"
