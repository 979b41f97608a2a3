"""ESPnet3's ``espnet3.utils`` surface: SCP helpers (:mod:`.scp_utils`)."""
