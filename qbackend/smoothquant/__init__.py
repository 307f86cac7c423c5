"""SmoothQuant W8A8: calibration, per-channel smoothing scales folded offline, int8 x int8 lowering.

>>> result = qbackend.calibrate(model, batches)                 # per-channel activation absmax
>>> result.save("minilm-calib")                                 # .safetensors + .json
>>> model = torch.compile(model, backend="qbackend",
...                       options={"preset": "w8a8", "calibration": result,
...                                "smoothquant": {"alpha": 0.5, "search_alpha": True}})

This package's ``__init__`` stays light (config and result types only) because
:mod:`qbackend.config` imports it; the calibration entry point is loaded on first use.
"""

from typing import Any

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


def __getattr__(name: str) -> Any:
    if name == "calibrate":
        from .calibration import calibrate

        return calibrate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
