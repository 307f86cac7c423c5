"""The "w8a8" preset's pass pipeline: find -> select -> SmoothQuant fold -> W8A8 lowering.

The compile path of the W8A8 workflow (``QuantConfig.smoothquant`` set). Layers are found and
selected exactly as for weight-only presets (include/exclude, min_params, tied weights); the fold
uses the calibration statistics of ``QuantConfig.calibration`` (none: naive W8A8) through
:func:`.scales.scale_rule`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ...passes import find_linears, select_layers
from ...passes.calibration_result import CalibrationResult
from ...passes.channel_fold import guard_folded
from ...passes.lowering import Lowered, LoweringResult
from ...passes.params import ParamRef
from ...passes.report import LayerReport, Report, float_row
from ...passes.select_layers import LayerPlan
from ...passes.weight_stamp import check_mode
from .config import SmoothQuantConfig
from .fold import FoldReport, smoothquant_fold
from .lower import ActQuant, W8A8Lowered, lower_w8a8, mark_quantized
from .scale_rule import scale_rule
from .scales import static_act_scale

log = logging.getLogger("qbackend")


@dataclass
class W8A8Result(LoweringResult):
    """The backend's `LoweringResult` plus what SmoothQuant did.

    fold: per-group smoothing (None when not smoothing); w8a8: the lowered layers; notes: fallbacks
    worth a log line (no calibration, per-tensor without statistics...); sources: parameters folded
    into constants (checked on every call by :meth:`guard_folded`, with ``weight_check``).
    """

    fold: FoldReport | None = None
    w8a8: list[W8A8Lowered] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: list[ParamRef] = field(default_factory=list)
    weight_check: str = "sampled"

    def guard_folded(self, compiled: Callable) -> Callable:
        """Wrap ``compiled`` with a per-call check that no folded parameter changed (``weight_check``).

        Folded constants (``W * s``, LayerNorm weights / s) cannot be refreshed from one parameter
        alone, so a change (or ``qbackend.refresh``) raises with either ``on_weight_change``: recompile.
        """
        return guard_folded(self.sources, self.weight_check, compiled, "SmoothQuant")


def run_w8a8(gm: fx.GraphModule, config: Any, measure_error: bool = False) -> W8A8Result:
    """Rewrite ``gm`` in place for ``config`` (a ``QuantConfig`` with ``smoothquant`` set)."""
    sq: SmoothQuantConfig = config.smoothquant
    cal: CalibrationResult | None = config.calibration
    result = W8A8Result(Report(graphs=1), weight_check=check_mode(config))
    sites = find_linears(gm)
    plans = select_layers(sites, config)
    lowered_nodes = {s.node for p in plans for s in p.lowerable_sites}
    if sq.smooth and cal is None:
        result.notes.append("no calibration given: naive W8A8 (pass options={'calibration': qbackend.calibrate(...)})")
    if sq.smooth and cal is not None and sites:
        result.fold = smoothquant_fold(
            gm, scale_rule(sq, cal, lowered_nodes), unfoldable=sq.unfoldable, explicit=sq.explicit, sites=sites
        )
        result.sources = result.fold.sources
        result.report.sections["smoothquant"] = [result.fold]
    act_fn = _act_fn(sq, cal, result.fold, result.notes)
    result.w8a8 = lower_w8a8(gm, plans, act_fn, result.fold, measure_error)
    if result.fold is not None:  # the float W * s copies are quantized now: do not keep them alive
        result.fold.weights.clear()
    result.nodes = sum(len(w.plan.lowerable_sites) for w in result.w8a8)
    result.lowered = [Lowered(w.entry, w.plan.param) for w in result.w8a8 if w.entry is not None]
    result.report.layers = _rows(plans, result.w8a8)
    _log(result)
    return result


def _act_fn(
    sq: SmoothQuantConfig, cal: CalibrationResult | None, fold: FoldReport | None, notes: list[str]
) -> Callable[[LayerPlan], ActQuant]:
    def act(plan: LayerPlan) -> ActQuant:
        if sq.activation == "token":
            return ActQuant(None, sq.outlier_threshold)
        stats = cal.get(plan.name) if cal is not None else None
        if stats is None:
            notes.append(f"{plan.name}: no calibration statistics for a static activation scale; per-token instead")
            return ActQuant(None, sq.outlier_threshold)
        s = fold.scale_of(plan.name) if fold is not None else None
        scale = static_act_scale(stats.absmax, s, sq.outlier_threshold).to(plan.param.tensor.device)
        return ActQuant(scale, sq.outlier_threshold)

    return act


def _rows(plans: list[LayerPlan], lowered: list[W8A8Lowered]) -> list[LayerReport]:
    done = {id(w.plan): w for w in lowered}
    rows = []
    for plan in plans:
        n, k = plan.sites[0].out_features, plan.sites[0].in_features
        row = float_row(plan.name, plan.param.fqn, plan.param.tensor, transposed=plan.transposed,
                        forms=tuple(s.form for s in plan.sites), reason=plan.reason)  # fmt: skip
        row.shape = (int(n), int(k))  # as the sites compute it
        low = done.get(id(plan))
        if low is not None:
            mark_quantized(row, int(n), int(k), _format_name(low.act))
            row.rel_error = low.rel_error
        rows.append(row)
    return rows


def _format_name(act: ActQuant) -> str:
    name = "w8a8-" + ("tensor" if act.act_scale is not None else "token")
    return name + (f"-outliers{act.threshold:g}" if act.threshold is not None else "")


def _log(result: W8A8Result) -> None:
    fold = result.fold
    if fold is not None and fold.groups:
        log.info(
            "qbackend: SmoothQuant: %d group(s) folded exactly, %d with an explicit multiply, %d not smoothed",
            len(fold.exact), len(fold.explicit), len(fold.skipped),
        )  # fmt: skip
        log.debug("qbackend: SmoothQuant groups\n%s", fold.table())
    for note in dict.fromkeys(result.notes):
        log.info("qbackend: %s", note)
