"""Declared inputs and outputs (:class:`Field`, of a registered :class:`Kind`) and their checks.

At ESPnet3's path (``espnet3.contract``); :mod:`.inference` holds the inference
config's ``contract:`` section (``InferenceContract``, ``load_inference_contract``).
"""

from espnet3_rules.contract.check import check_declaration
from espnet3_rules.contract.field import Field
from espnet3_rules.contract.kinds import KINDS, Kind, register_kind
from espnet3_rules.contract.normalizers import register_normalizer

__all__ = ["KINDS", "Field", "Kind", "check_declaration", "register_kind", "register_normalizer"]
