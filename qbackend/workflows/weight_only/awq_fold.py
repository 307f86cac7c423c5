"""AWQ's ``1 / s`` folded into the op producing the layers' input, where that is exact.

The compile path's step before lowering (method "awq" with ``fold``): the generic pass
:func:`qbackend.passes.channel_fold.channel_fold` finds each group of planned linears sharing one
input and its producer. Where the fold is exact (Llama: ``input_layernorm`` -> q/k/v,
``post_attention_layernorm`` -> gate/up, ``up_proj``'s output rows -> down_proj), the group gets ONE s,
searched jointly over the group's weights (as AutoAWQ does for q/k/v; the producing linear's rows
already divided by the next group's s), folded into the producer; each layer is then quantized as
``Q(W * s)`` with that s (clip search per layer) and reads its input unchanged. Elsewhere
(``unfoldable="skip"`` here) each layer keeps its own s and an explicit multiply, reported by the
method's rows with the fold's reason. ``fold="multiply"``: the same groups and s, with one explicit
multiply per group instead of the exact fold (the comparison the fold must match within float
rounding, where no producer is itself a quantized linear).

A layer whose calibration statistics are unusable is never folded (its group keeps the per-layer
path, which raises or falls back as the method says).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ...formats.awq import search_scale
from ...passes.channel_fold import FoldReport, SmoothGroup, channel_fold
from ...passes.select_layers import LayerPlan

REPORT_META = "qbackend_awq_fold"


@dataclass
class GroupScale:
    """One group's jointly searched s (``alpha``; ``duo``: divided by the weight statistic too)."""

    s: torch.Tensor
    alpha: float
    duo: bool
    searched: bool = True


def awq_fold(gm: fx.GraphModule, plans: list[LayerPlan], config: Any) -> FoldReport:
    """Fold a jointly searched s into the producer of each exactly foldable group of ``plans``
    (``gm`` in place; idempotent). Groups without an exact fold are reported "skipped", with the reason."""
    sites = [s for p in plans for s in p.lowerable_sites]
    by_name = {p.name: p for p in plans}
    exact = config.method.fold is True  # "multiply": the same groups and s, with explicit multiplies
    return channel_fold(gm, _scale_fn(by_name, config), unfoldable="skip", sites=sites, scale_weights=False,
                        fold_exact=exact, meta_key=REPORT_META, tag="awq")  # fmt: skip


def _scale_fn(by_name: dict[str, LayerPlan], config: Any) -> Any:
    method, cal = config.method, config.calibration

    def scale(group: SmoothGroup) -> GroupScale | str:
        schemes = {by_name[n].scheme for n in group.names}
        if len(schemes) != 1:
            return "the group's layers have different formats"
        stats = [cal.get(n) for n in group.names]
        k = group.in_features
        for name, st in zip(group.names, stats, strict=True):
            if st is None or st.hessian is None or st.absmean is None or st.tokens < method.min_tokens:
                return f"{name}: no usable calibration statistics (its row says why)"
            if tuple(st.hessian.shape) != (k, k) or st.absmean.numel() != k:
                return f"{name}: calibration statistics of another shape"
        h, act = stats[0].hessian.float(), stats[0].absmean.float()
        if not (bool(torch.isfinite(h).all()) and bool(torch.isfinite(act).all())):
            return f"{group.names[0]}: calibration statistics hold NaN/Inf"
        weights = [w.detach().float().to(h.device) for w in group.weights]
        if not all(bool(torch.isfinite(w).all()) for w in weights):
            return "a weight of the group holds NaN/Inf"
        scheme = next(iter(schemes))
        alpha, s, _, duo = search_scale(weights, h, act.to(h.device), scheme, method.grid, method.duo)
        return GroupScale(s.float().cpu(), alpha, duo)

    return scale


def fold_of(report: FoldReport, layer: str) -> tuple[torch.Tensor, str] | None:
    """``(s, description)`` of ``layer``'s group s in ``report`` (folded, or one explicit multiply for the
    group with ``fold="multiply"``), or None (the layer's own s and multiply)."""
    for g in report.exact + report.explicit:
        if layer in g.layers:
            c: GroupScale = g.choice
            where = f"folded: {g.kind} -> {g.target}" if g.exact else "group multiply"
            return c.s, f"group alpha={c.alpha:g}{' (x/w)' if c.duo else ''} {where}"
    return None


def unfolded_reason(report: FoldReport, layer: str) -> str:
    """Why ``layer``'s group has no exact fold ("" if it has one or is not in the report)."""
    for g in report.skipped:
        if layer in g.layers:
            return g.reason
    return ""
