"""The weight-only compile path on a Dynamo graph: find -> select -> (AWQ fold) -> lower.

With a calibrated ``method`` ("gptq" or "awq", :mod:`.method`), the weights are rounded with the
calibration's statistics (HQQ: refined without data); the per-layer outcome is in
``report.sections[method]``. AWQ with ``fold`` first folds a jointly searched s into the producer
of each exactly foldable group (:mod:`.awq_fold`; the groups are in ``report.sections["awq_fold"]``);
parameters folded into constants are then checked on every call (:meth:`WeightOnlyResult.guard_folded`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ...passes import find_linears, select_layers
from ...passes.channel_fold import guard_folded
from ...passes.lowering import LoweringResult
from ...passes.params import ParamRef
from ...passes.select_layers import LayerPlan
from ...passes.weight_stamp import check_mode
from .awq_fold import awq_fold, fold_of, unfolded_reason
from .lower import lower_linears
from .method import CalibratedQuantizer, calibrated_quantizer, layer_progress, method_section


@dataclass
class WeightOnlyResult(LoweringResult):
    """The backend's `LoweringResult` plus the parameters an AWQ fold copied into constants."""

    sources: list[ParamRef] = field(default_factory=list)
    weight_check: str = "sampled"

    def guard_folded(self, compiled: Callable) -> Callable:
        """``compiled`` with a per-call check that no folded parameter changed (raises: recompile)."""
        return guard_folded(self.sources, self.weight_check, compiled, "AWQ")


def run_weight_only(gm: fx.GraphModule, config: Any, measure_error: bool = False) -> LoweringResult:
    """Rewrite ``gm`` in place for ``config`` (a ``QuantConfig``: format, include/exclude, min_params, method,
    compute)."""
    plans = select_layers(find_linears(gm), config)
    method = getattr(config, "method", None)
    compute = getattr(config, "compute", "auto")
    if method is None or not method.refines:
        return lower_linears(gm, plans, measure_error=measure_error, compute=compute)
    fold = awq_fold(gm, plans, config) if method.name == "awq" and method.fold else None

    def quantizer_for(plan: LayerPlan) -> CalibratedQuantizer | None:
        q = calibrated_quantizer(plan.name, plan.scheme, config, None if fold is None else fold_of(fold, plan.name))
        if q is not None and fold is not None and q.fold is None:
            q.unfolded = unfolded_reason(fold, plan.name)
        return q

    low = lower_linears(gm, plans, measure_error, quantizer_for, layer_progress(method.name), compute, fold)
    result = WeightOnlyResult(low.report, low.lowered, low.nodes, weight_check=check_mode(config))
    # A weight quantized by an earlier compile is shared: report the run that made it.
    runs = [getattr(lw.entry, "quantizer", None) for lw in result.lowered]
    result.report.sections[method.name] = [method_section(method, runs)]
    if fold is not None:
        result.sources = fold.sources
        result.report.sections["awq_fold"] = [fold]
    return result
