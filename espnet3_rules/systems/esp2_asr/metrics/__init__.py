"""ESPnet3's ``espnet3.systems.esp2_asr.metrics``: :class:`~.wer.WER`, :class:`~.cer.CER` (jiwer counts)."""
