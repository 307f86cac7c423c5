"""The public SmoothQuant names (the workflow itself is :mod:`qbackend.workflows.w8a8`).

>>> result = qbackend.smoothquant.calibrate(model, batches)
>>> options = {"preset": "w8a8", "calibration": result, "smoothquant": SmoothQuantConfig(alpha=0.6)}
"""

from ..workflows.w8a8 import (
    CalibrationError,
    CalibrationResult,
    LayerStats,
    SmoothQuantConfig,
    SmoothQuantConfigError,
    calibrate,
)

__all__ = [
    "CalibrationError",
    "CalibrationResult",
    "LayerStats",
    "SmoothQuantConfig",
    "SmoothQuantConfigError",
    "calibrate",
]
