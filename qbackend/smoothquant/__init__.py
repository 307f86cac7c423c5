"""The public SmoothQuant names (the workflow itself is :mod:`qbackend.workflows.w8a8`).

>>> result = qbackend.smoothquant.calibrate(model, batches)
>>> options = {"preset": "w8a8", "calibration": result, "smoothquant": SmoothQuantConfig(alpha=0.6)}
"""

import importlib
from typing import Any

_PUBLIC = (
    "CalibrationError",
    "CalibrationResult",
    "LayerStats",
    "SmoothQuantConfig",
    "SmoothQuantConfigError",
    "calibrate",
)
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    # Resolved on first use: this package also holds the outlier op (``.ops``), which the workflow
    # imports, so importing the workflow here at import time would make a cycle.
    if name in _PUBLIC:
        return getattr(importlib.import_module("qbackend.workflows.w8a8"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
