"""SmoothQuant scales: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), fixed alpha or searched per group.

Pure tensor functions (no FX). ``x / s`` and ``W * s`` (input channels) compute the same ``x @ W^T``;
s is chosen so both are easy to quantize to int8. ``simulate_w8a8`` reproduces the numerics of
``qbackend::w8a8_linear`` (and of the outlier decomposition) in float for the alpha search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .config import SmoothQuantConfig
from .result import LayerStats

#: s is clamped to [1/S_MAX, S_MAX]: no channel is scaled into fp32 under/overflow.
S_MAX = 1e5


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel s (fp32, finite, > 0). Channels never active (absmax 0) or with an all-zero
    weight column get s = 1 (nothing to migrate, and 0^alpha / 0 would be NaN)."""
    a = act_absmax.detach().double().cpu()
    w = weight_absmax.detach().double().cpu()
    ok = (a > 0) & (w > 0)
    s = a.clamp(min=1e-30).pow(alpha) / w.clamp(min=1e-30).pow(1.0 - alpha)
    s = torch.where(ok & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(1.0 / S_MAX, S_MAX).float()


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |W_j| per input channel over every [N, K] weight of a group sharing one input."""
    return torch.stack([w.detach().abs().amax(dim=0).float().cpu() for w in weights]).amax(dim=0)


def static_act_scale(act_absmax: torch.Tensor, s: torch.Tensor | None, threshold: float | None) -> torch.Tensor:
    """Static per-tensor int8 scale of the (smoothed) input: max_j absmax_j / s_j / 127, over the
    channels below the outlier threshold (those above stay float). Never 0 or NaN."""
    a = act_absmax.detach().float().cpu()
    if s is not None:
        a = a / s.float().cpu()
    if threshold is not None:
        a = a[a < threshold]
    top = float(a.max()) if a.numel() else 0.0
    return torch.tensor([top / 127.0 if top > 0 else 1.0], dtype=torch.float32)


def quantize_rows(w: torch.Tensor) -> torch.Tensor:
    """Dequantized symmetric int8, one scale per row (as the W8A8 weight)."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / safe), -127, 127) * scale


def simulate_w8a8(
    x: torch.Tensor,
    w: torch.Tensor,
    act_scale: torch.Tensor | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """Float simulation of ``w8a8_linear`` (no bias): x [M, K] (already smoothed), w [N, K] (already
    scaled). Per-token dynamic activation scales unless ``act_scale`` (static per-tensor) is given;
    with ``threshold``, columns with any |x| >= threshold are computed in float (LLM.int8())."""
    x = x.float()
    wq = quantize_rows(w.float())
    y_out = None
    if threshold is not None:
        cols = (x.abs() >= threshold).any(dim=0)
        if bool(cols.any()):
            y_out = x[:, cols] @ wq[:, cols].t()
            x = x.masked_fill(cols, 0.0)
    if act_scale is None:
        sx = x.abs().amax(dim=1, keepdim=True) / 127.0
    else:
        sx = act_scale.float().reshape(1, 1)
    safe = torch.where(sx > 0, sx, torch.ones_like(sx))
    y = (torch.clamp(torch.round(x / safe), -127, 127) * sx) @ wq.t()
    return y if y_out is None else y + y_out


@dataclass
class ScaleChoice:
    """The s of one smoothing group and how it was chosen.

    alpha: the alpha used; error: relative output error of the group on the calibration samples
    (sum over its layers of ||Y_w8a8 - Y||^2 / ||Y||^2; None without samples); errors: error per
    alpha tried (search only); act_scale: static per-tensor activation scale (activation="tensor").
    """

    s: torch.Tensor
    alpha: float
    searched: bool = False
    error: float | None = None
    errors: dict[float, float] = field(default_factory=dict)


def group_error(
    samples: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor | None, absmax: torch.Tensor,
    config: SmoothQuantConfig,
) -> float:  # fmt: skip
    """Relative W8A8 output error of a group with smoothing ``s`` (None: unsmoothed) on ``samples``."""
    x = samples.float()
    xs = x if s is None else x / s
    act = static_act_scale(absmax, s, config.outlier_threshold) if config.activation == "tensor" else None
    total = 0.0
    for w in weights:
        w = w.detach().float().cpu()
        ref = x @ w.t()
        ws = w if s is None else w * s
        err = simulate_w8a8(xs, ws, act, config.outlier_threshold) - ref
        total += float(err.pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))
    return total


def choose_scale(
    stats: LayerStats, weights: Sequence[torch.Tensor], config: SmoothQuantConfig, alpha: float
) -> ScaleChoice:
    """s for a group of [N, K] weights sharing one input with statistics ``stats``: fixed ``alpha``,
    or (``config.search_alpha`` and samples recorded) the grid alpha with the smallest group error."""
    wmax = weight_absmax(weights)
    if not config.search_alpha or stats.samples is None or stats.samples.shape[0] == 0:
        s = smoothing_scale(stats.absmax, wmax, alpha)
        err = None
        if stats.samples is not None and stats.samples.shape[0] > 0:
            err = group_error(stats.samples, weights, s, stats.absmax, config)
        return ScaleChoice(s, alpha, False, err)
    errors: dict[float, float] = {}
    best: tuple[float, float, torch.Tensor] | None = None
    for a in config.alpha_grid:
        s = smoothing_scale(stats.absmax, wmax, a)
        e = group_error(stats.samples, weights, s, stats.absmax, config)
        errors[a] = e
        # Ties go to the alpha closest to the default 0.5 (the better-tested migration strength).
        key = (e, abs(a - 0.5))
        if best is None or key < (best[0], abs(best[1] - 0.5)):
            best = (e, a, s)
    assert best is not None
    return ScaleChoice(best[2], best[1], True, best[0], errors)
