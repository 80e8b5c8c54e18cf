"""TODO docstring."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any


def to_plain(value: Any) -> Any:
    """Dataclasses/tuples -> dicts/lists of plain values (what torch.load(weights_only=True)
    and JSON accept)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
