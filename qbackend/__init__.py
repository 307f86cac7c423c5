"""qbackend: a quantization compiler delivered as a torch.compile backend.

>>> model = torch.compile(model, backend="qbackend", options={"preset": "int8"})
>>> print(qbackend.explain(model_eager, example_input))
>>> qbackend.quantize_(model, "nf4")   # free the float weights of the linear layers
>>> cal = qbackend.calibrate(model, batches)  # SmoothQuant W8A8: options={"preset": "w8a8", "calibration": cal}
>>> qbackend.qat.prepare(model, {"qat": QATConfig()}); ...train...; qbackend.convert(model)  # QAT
>>> model = qbackend.from_pretrained("llama-dir", "nf4")  # quantized while the shards are read
>>> qbackend.save_pretrained(model, "llama-nf4")          # a Hugging Face directory, written atomically

Layers (each imports only from those before it): ``formats`` -> ``kernels`` -> ``passes`` ->
``workflows`` (weight_only, w8a8, qat) -> ``core`` (+ ``serialization``) -> front doors (cli, demo,
export, testing, and the public re-export modules ``qbackend.qat`` / ``qbackend.smoothquant``).
"""

import importlib

from . import qat, smoothquant
from ._version import __version__
from .core.backend import StaleWeightError
from .core.config import QuantConfig
from .core.explain import explain
from .core.quantize import quantize_
from .core.refresh import refresh
from .core.registry import Workflow, register_workflow
from .passes.report import LayerReport, Report
from .workflows.qat import QATConfig
from .workflows.qat.api import convert
from .workflows.w8a8 import CalibrationResult, W8A8Linear, calibrate
from .workflows.weight_only import QuantizedLinear

__all__ = [
    "CalibrationResult",
    "LayerReport",
    "QATConfig",
    "QuantConfig",
    "QuantizedLinear",
    "Report",
    "StaleWeightError",
    "W8A8Linear",
    "Workflow",
    "__version__",
    "calibrate",
    "convert",
    "explain",
    "qat",
    "quantize_",
    "refresh",
    "smoothquant",
    "register_workflow",
]

# Loaded on first use so that `import qbackend` stays fast (safetensors, torch.export, torch-mlir, transformers).
_LAZY = {"save": "serialization", "load": "serialization", "export_mlir": "export", "from_pretrained": "pretrained",
         "save_pretrained": "pretrained"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
