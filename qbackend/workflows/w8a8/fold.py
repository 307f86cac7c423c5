"""SmoothQuant folding: :func:`smoothquant_fold` moves the per-input-channel s of each smoothing group
from the activations into the weights, with the generic pass :mod:`qbackend.passes.channel_fold`
(exact folds into the producing norm / multiply / linear rows; an explicit multiply or no smoothing
elsewhere, reported).

With an explicit multiply, ``explicit="per_layer"`` (default) gives each linear its own s (more
accurate: v_proj does not inherit q/k's weight ranges); an exact fold gives the group one s,
computed from the max over all its weights (:mod:`.scale_rule`).
"""

from __future__ import annotations

import torch.fx as fx

from ...passes.channel_fold import (
    EXACT_KINDS,
    NODE_META,
    FoldKind,
    FoldReport,
    GroupFold,
    ScaleFn,
    SmoothGroup,
    channel_fold,
)
from ...passes.find_linears import LinearSite

REPORT_META = "qbackend_smoothquant_fold"

__all__ = [
    "EXACT_KINDS",
    "NODE_META",
    "REPORT_META",
    "FoldKind",
    "FoldReport",
    "GroupFold",
    "ScaleFn",
    "SmoothGroup",
    "smoothquant_fold",
]


def smoothquant_fold(
    gm: fx.GraphModule,
    scale_fn: ScaleFn,
    *,
    unfoldable: str = "multiply",
    explicit: str = "per_layer",
    sites: list[LinearSite] | None = None,
) -> FoldReport:
    """Smooth every linear group of ``gm`` (in place) with the s ``scale_fn`` returns (a `ScaleChoice`).

    unfoldable: "multiply" or "skip" where no exact fold exists; explicit: "per_layer" or "shared"
    scales for explicit multiplies; sites: the graph's linear sites if already found. Idempotent.
    """
    return channel_fold(gm, scale_fn, unfoldable=unfoldable, explicit=explicit, sites=sites,
                        meta_key=REPORT_META, tag="sq")  # fmt: skip
