"""Weight-only quantization (nf4/fp4/int4/int8 weights, float activations): the default workflow.

Compile path: :func:`.pipeline.run_weight_only`; module path: :func:`.quantize.quantize_weight_only`
(`QuantizedLinear`); save/load: :mod:`.records` (records of kind ``weight_only``); rounding
method (round to nearest, GPTQ): :mod:`.method`.
"""

from collections.abc import Callable
from typing import Any

from .linear import QuantizedLinear
from .lower import lower_linears
from .method import MethodConfig, MethodConfigError, MethodReport, normalize
from .pipeline import WeightOnlyResult, run_weight_only
from .quantize import prequantized_rows, quantize_weight_only
from .records import RECORD_KINDS, build_quantized_linear, record_quantized_linear


def _guard(result: Any, compiled: Callable) -> Callable:
    """An AWQ fold's per-call check that no folded parameter changed (other results: none)."""
    return result.guard_folded(compiled) if isinstance(result, WeightOnlyResult) else compiled


#: this workflow's handlers, as the fields of ``qbackend.core.registry.Workflow``
WORKFLOW = {
    "name": "weight_only",
    "compile": run_weight_only,
    "quantize": quantize_weight_only,
    "normalize": normalize,
    "guard": _guard,
    "explain": prequantized_rows,
    "modules": (QuantizedLinear,),
    "record": record_quantized_linear,
    "build": build_quantized_linear,
    "record_kinds": RECORD_KINDS,
}

__all__ = [
    "WORKFLOW",
    "MethodConfig",
    "MethodConfigError",
    "MethodReport",
    "QuantizedLinear",
    "lower_linears",
    "quantize_weight_only",
    "run_weight_only",
]
