"""ESPnet3's ``espnet3.components`` surface: the metric base class (:mod:`.metrics`)."""
