"""Quantization-aware training and QLoRA fine-tuning: the QAT workflow (public names in :mod:`qbackend.qat`).

Compile path: :func:`.pipeline.run_qat` (fake quantization while grad is enabled, the deployed
quantized ops otherwise); module path: the weight-only one (``quantize_`` quantizes the float
weights; :func:`.api.convert` deploys prepared layers); save/load: :mod:`.records` (deployed layers
that quantize their input are weight-only records with activation settings).
"""

from typing import Any

from ..weight_only import quantize_weight_only
from .config import QATConfig, QATConfigError
from .deploy import QATQuantizedLinear
from .pipeline import has_qat_state, run_qat
from .records import RECORD_KINDS, build_qat_linear, record_qat_linear


def _normalize(config: Any) -> dict[str, Any]:
    """The ``qat`` field of a ``QuantConfig``, validated (raises `QATConfigError`)."""
    return {"qat": QATConfig.from_value(config.qat)}


#: this workflow's handlers, as the fields of ``qbackend.core.registry.Workflow``
WORKFLOW = {
    "name": "qat",
    "compile": run_qat,
    "quantize": quantize_weight_only,
    "normalize": _normalize,
    "detect": has_qat_state,
    "modules": (QATQuantizedLinear,),
    "record": record_qat_linear,
    "build": build_qat_linear,
    "record_kinds": RECORD_KINDS,
}

__all__ = ["WORKFLOW", "QATConfig", "QATConfigError", "run_qat"]
