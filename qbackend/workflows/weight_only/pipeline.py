"""The weight-only compile path on a Dynamo graph: find -> select -> lower.

With a calibrated ``method`` ("gptq" or "awq", :mod:`.method`), the weights are rounded with the
calibration's statistics; the per-layer outcome is in ``report.sections[method]``.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ...passes import find_linears, select_layers
from ...passes.lowering import LoweringResult
from ...passes.select_layers import LayerPlan
from .lower import lower_linears
from .method import CalibratedQuantizer, calibrated_quantizer, layer_progress, method_section


def run_weight_only(gm: fx.GraphModule, config: Any, measure_error: bool = False) -> LoweringResult:
    """Rewrite ``gm`` in place for ``config`` (a ``QuantConfig``: format, include/exclude, min_params, method,
    compute)."""
    plans = select_layers(find_linears(gm), config)
    method = getattr(config, "method", None)
    compute = getattr(config, "compute", "auto")
    if method is None or not method.calibrated:
        return lower_linears(gm, plans, measure_error=measure_error, compute=compute)

    def quantizer_for(plan: LayerPlan) -> CalibratedQuantizer | None:
        return calibrated_quantizer(plan.name, plan.scheme, config)

    result = lower_linears(gm, plans, measure_error, quantizer_for, layer_progress(method.name), compute)
    # A weight quantized by an earlier compile is shared: report the run that made it.
    runs = [getattr(low.entry, "quantizer", None) for low in result.lowered]
    result.report.sections[method.name] = [method_section(method, runs)]
    return result
