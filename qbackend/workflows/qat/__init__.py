"""Quantization-aware training and QLoRA fine-tuning: the QAT workflow (public names in :mod:`qbackend.qat`).

Compile path: :func:`.pipeline.run_qat` (fake quantization while grad is enabled, the deployed
quantized ops otherwise); module path: the weight-only one (``quantize_`` quantizes the float
weights; :func:`.api.convert` deploys prepared layers).
"""

from typing import Any

from ..weight_only import quantize_weight_only
from .config import QATConfig, QATConfigError
from .pipeline import has_qat_state, run_qat


def _normalize(config: Any) -> dict[str, Any]:
    """The ``qat`` field of a ``QuantConfig``, validated (raises `QATConfigError`)."""
    if config.smoothquant not in (None, False):
        raise QATConfigError("smoothquant (W8A8) and qat cannot be combined: QAT trains weight-only formats")
    return {"qat": QATConfig.from_value(config.qat)}


#: this workflow's handlers, as the fields of ``qbackend.core.registry.Workflow``
WORKFLOW = {
    "name": "qat",
    "compile": run_qat,
    "quantize": quantize_weight_only,
    "options": ("qat",),
    "normalize": _normalize,
    "detect": has_qat_state,
}

__all__ = ["WORKFLOW", "QATConfig", "QATConfigError", "run_qat"]
