"""ESPnet3's ``espnet3.systems.esp2_asr`` surface: the ASR metrics (:mod:`.metrics`)."""
