"""SmoothQuant W8A8: calibration, per-channel smoothing scales folded offline, int8 x int8 lowering."""

from .calibrate import calibrate
from .config import SmoothQuantConfig, SmoothQuantConfigError
from .result import CalibrationError, CalibrationResult, LayerStats

__all__ = [
    "CalibrationError",
    "CalibrationResult",
    "LayerStats",
    "SmoothQuantConfig",
    "SmoothQuantConfigError",
    "calibrate",
]
