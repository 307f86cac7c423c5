"""qbackend: a quantization compiler delivered as a torch.compile backend.

>>> model = torch.compile(model, backend="qbackend", options={"preset": "int8"})
>>> print(qbackend.explain(model_eager, example_input))
>>> qbackend.quantize_(model, "nf4")   # free the float weights of the linear layers
>>> cal = qbackend.calibrate(model, batches)  # SmoothQuant W8A8: options={"preset": "w8a8", "calibration": cal}
>>> qbackend.qat.prepare(model, {"qat": QATConfig()}); ...train...; qbackend.convert(model)  # QAT
"""

__version__ = "0.1.0"

from . import qat  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .explain import explain  # noqa: E402
from .qat import QATConfig  # noqa: E402
from .qat.api import convert  # noqa: E402
from .quantize_module import QuantizedLinear, quantize_  # noqa: E402
from .report import LayerReport, Report  # noqa: E402
from .smoothquant import CalibrationResult, calibrate  # noqa: E402
from .smoothquant.linear import W8A8Linear  # noqa: E402

__all__ = [
    "CalibrationResult",
    "LayerReport",
    "QATConfig",
    "QuantConfig",
    "QuantizedLinear",
    "Report",
    "W8A8Linear",
    "__version__",
    "calibrate",
    "convert",
    "explain",
    "qat",
    "quantize_",
]

# Loaded on first use so that `import qbackend` stays fast (safetensors, torch.export, torch-mlir).
_LAZY = {"save": "serialization", "load": "serialization", "export_mlir": "export"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
