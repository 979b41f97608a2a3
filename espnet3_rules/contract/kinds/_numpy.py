"""numpy on demand: audio values need it, importing the contract package does not."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any


def numpy() -> ModuleType:
    """The numpy module, imported on first use."""
    import numpy as np

    return np


def is_numpy(value: Any, *type_names: str) -> bool:
    """``isinstance(value, numpy.<type_name>, ...)`` without importing numpy (a numpy value means it is loaded)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, tuple(getattr(np, name) for name in type_names))
