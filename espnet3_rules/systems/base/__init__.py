"""ESPnet3's ``espnet3.systems.base`` surface: the inference runner and provider."""
