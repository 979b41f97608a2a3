"""At ESPnet3's path ``espnet3.systems.base.inference_provider``: the inference provider.

For now the same class as :mod:`espnet3_rules.parallel.inference_provider` (static
``build_dataset(config)`` / ``build_model(config)`` that a subclass implements).
"""

from espnet3_rules.parallel.inference_provider import InferenceProvider

__all__ = ["InferenceProvider"]
