"""How error messages show a value the user passed: short, never a tensor or a whole object."""

from __future__ import annotations

from typing import Any


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a short scalar or string; otherwise "a <type>" (a shape for tensors)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        text = repr(value)
        if len(text) <= limit:
            return text
        return f"a {type(value).__name__} of length {len(value)}" if isinstance(value, str) else text[:limit] + "..."
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"a {type(value).__name__} of shape {tuple(shape)}"
    return f"a {type(value).__name__}"
