"""`to_plain`: any settings or record value as the plain values JSON and
torch.load(weights_only=True) accept (dicts, lists, str, int, float, bool, None)."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import PurePath
from typing import Any

import numpy as np


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, NumPy arrays -> (nested) lists and NumPy
    scalars -> Python numbers, Paths -> str, dict keys -> str; recursively, the rest as is."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return to_plain(value.tolist())
    if isinstance(value, PurePath):
        return str(value)
    return value
