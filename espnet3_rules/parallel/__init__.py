"""ESPnet3's ``espnet3.parallel`` surface: ``espnet3.`` becomes ``espnet3_rules.`` in an import line."""
