"""Character error rate (ESPnet3's ``espnet3.systems.esp2_asr.metrics.cer``)."""

from __future__ import annotations

from espnet3_rules.contract import Field
from espnet3_rules.systems.esp2_asr.metrics.error_rate import ErrorRate


class CER(ErrorRate):
    """Corpus CER in percent of reference characters (spaces count): ``{"CER": 3.4}``; writes
    ``<test>/cer_alignment``.

    Args:
        clean_types: espnet2 ``TextCleaner`` types applied to both texts (``None``: none).
    """

    outputs = (Field("CER", "number"),)
    unit = "characters"
    jiwer_process = "process_characters"
