"""The sharding engine: job description, plan and fingerprint, one shard, merge.

It drives user classes only through the public ESPnet3 contract and never imports
``espnet3_rules.parallel`` or ``espnet3_rules.systems``.
"""
