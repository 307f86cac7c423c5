"""The "w8a8" preset's pass pipeline: find -> select -> SmoothQuant fold -> W8A8 lowering.

Called by :func:`qbackend.backend.run_passes` when ``QuantConfig.smoothquant`` is set. Layers are
found and selected exactly as for weight-only presets (include/exclude, min_params, tied weights);
the fold uses the calibration statistics of ``QuantConfig.calibration`` (none: naive W8A8).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..passes import find_linears, select_layers
from ..passes.lower_linears import Lowered, LoweringResult
from ..passes.params import ParamRef
from ..passes.select_layers import LayerPlan
from ..passes.smoothquant_fold import FoldReport, SmoothGroup, smoothquant_fold
from ..passes.w8a8_lower import ActQuant, W8A8Lowered, lower_w8a8
from ..report import LayerReport, Report
from .config import SmoothQuantConfig
from .result import CalibrationResult
from .scales import ScaleChoice, choose_scale, static_act_scale

log = logging.getLogger("qbackend")


@dataclass
class W8A8Result(LoweringResult):
    """The backend's `LoweringResult` plus what SmoothQuant did.

    fold: per-group smoothing (None when not smoothing); w8a8: the lowered layers; notes: fallbacks
    worth a log line (no calibration, per-tensor without statistics...); sources: parameters folded
    into constants (checked on every call by :meth:`guard_folded`).
    """

    fold: FoldReport | None = None
    w8a8: list[W8A8Lowered] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: list[ParamRef] = field(default_factory=list)

    def guard_folded(self, compiled: Callable) -> Callable:
        """Wrap ``compiled`` with a per-call check that no folded parameter changed in place.

        Folded constants (``W * s``, LayerNorm weights / s) cannot be refreshed from one parameter
        alone, so a change raises (with either ``on_weight_change``): recompile to use new weights.
        """
        checks = [(r.fqn, r.input_index, None if r.input_index is not None else r.tensor, _version(r.tensor),
                   r.tensor.data_ptr()) for r in self.sources]  # fmt: skip
        if not checks:
            return compiled

        def run(*args: Any) -> Any:
            for fqn, idx, held, version, ptr in checks:
                p = args[idx] if idx is not None else held
                if _version(p) != version or p.data_ptr() != ptr:
                    from ..backend import StaleWeightError

                    raise StaleWeightError(
                        f"qbackend: parameter {fqn!r} was changed in place after compiling, but SmoothQuant folded "
                        "it into constants; recompile (torch._dynamo.reset()) to use the new value"
                    )
            return compiled(*args)

        return run


def run_w8a8(gm: fx.GraphModule, config: Any, measure_error: bool = False) -> W8A8Result:
    """Rewrite ``gm`` in place for ``config`` (a ``QuantConfig`` with ``smoothquant`` set)."""
    sq: SmoothQuantConfig = config.smoothquant
    cal: CalibrationResult | None = config.calibration
    result = W8A8Result(Report(graphs=1))
    sites = find_linears(gm)
    plans = select_layers(sites, config)
    lowered_nodes = {s.node for p in plans for s in p.lowerable_sites}
    if sq.smooth and cal is None:
        result.notes.append("no calibration given: naive W8A8 (pass options={'calibration': qbackend.calibrate(...)})")
    if sq.smooth and cal is not None and sites:
        result.fold = smoothquant_fold(
            gm, _scale_fn(sq, cal, lowered_nodes), unfoldable=sq.unfoldable, explicit=sq.explicit, sites=sites
        )
        result.sources = result.fold.sources
    act_fn = _act_fn(sq, cal, result.fold, result.notes)
    result.w8a8 = lower_w8a8(gm, plans, act_fn, result.fold, measure_error)
    if result.fold is not None:  # the float W * s copies are quantized now: do not keep them alive
        result.fold.weights.clear()
    result.nodes = sum(len(w.plan.lowerable_sites) for w in result.w8a8)
    result.lowered = [Lowered(w.entry, w.plan.param) for w in result.w8a8 if w.entry is not None]
    result.report.layers = _rows(plans, result.w8a8)
    _log(result)
    return result


#: (calibration, config, layers, weights) -> choice: recompiles (new shapes, grad mode, graph breaks)
#: reuse a search instead of repeating it. Bounded; weights are identified by content statistics.
_CHOICES: OrderedDict[tuple, ScaleChoice | str] = OrderedDict()
_CHOICES_MAX = 4096


def _scale_fn(
    sq: SmoothQuantConfig, cal: CalibrationResult, lowered: set[fx.Node]
) -> Callable[[SmoothGroup], ScaleChoice | str]:
    def scale(group: SmoothGroup) -> ScaleChoice | str:
        if not any(s.node in lowered for s in group.sites):
            return "not quantized (stays float)"
        stats = next((st for n in group.names if (st := cal.get(n)) is not None), None)
        if stats is None:
            return "no calibration statistics (layer not reached during calibration)"
        if stats.in_features != group.in_features:
            return (f"calibration statistics have {stats.in_features} channels, the layer {group.in_features} "
                    "(calibrated on another model?)")  # fmt: skip
        key = (cal.fingerprint(), sq.fingerprint(), group.names, tuple(_content_key(w) for w in group.weights))
        if key not in _CHOICES:
            choice = choose_scale(stats, group.weights, sq, sq.alpha_for(group.names[0]))
            if choice.s is None:
                choice = f"alpha search: no smoothing gives the smallest error ({choice.error:.3g})"
            _CHOICES[key] = choice
            while len(_CHOICES) > _CHOICES_MAX:
                _CHOICES.popitem(last=False)
        return _CHOICES[key]

    return scale


def _content_key(w: torch.Tensor) -> tuple:
    w64 = w.detach().double()
    return (tuple(w.shape), str(w.dtype), float(w64.sum()), float(w64.pow(2).sum()), float(w64[..., ::7].abs().sum()))


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
        w = plan.param.tensor
        n, k = plan.sites[0].out_features, plan.sites[0].in_features
        row = LayerReport(
            name=plan.name, param=plan.param.fqn, shape=(int(n), int(k)), forms=tuple(s.form for s in plan.sites),
            quantized=False, reason=plan.reason, bits_per_param=float(w.element_size() * 8),
            bytes_before=w.numel() * w.element_size(), bytes_after=w.numel() * w.element_size(),
            transposed=plan.transposed,
        )  # fmt: skip
        low = done.get(id(plan))
        if low is not None:
            row.quantized, row.format = True, _format_name(low.act)
            row.bits_per_param = 8.0 + 32.0 / k  # int8 codes + one fp32 scale per output channel
            row.bytes_after = n * k + 4 * n
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


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter; data_ptr still catches swaps
        return -1

