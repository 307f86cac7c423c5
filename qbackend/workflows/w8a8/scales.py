"""SmoothQuant scales: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), fixed alpha or searched per group.

Pure tensor functions (no FX). ``x / s`` and ``W * s`` (input channels) compute the same ``x @ W^T``;
s is chosen so both are easy to quantize to int8. ``simulate_w8a8`` reproduces the numerics of
``qbackend::w8a8_linear`` (and of the outlier decomposition) in float for the alpha search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ...passes.calibration_result import LayerStats
from .config import SmoothQuantConfig

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
    """Static per-tensor int8 scale of the (smoothed) input: max_j absmax_j / s_j / 127, each channel's
    maximum capped at the outlier threshold. Never 0 or NaN.

    Capped, not dropped: whether a column stays float is decided per batch (any |x| >= threshold), so a
    channel that reached the threshold during calibration can come back below it at run time and
    must then fit the int8 range without clipping.
    """
    a = act_absmax.detach().float().cpu()
    if s is not None:
        a = a / s.float().cpu()
    if threshold is not None:
        a = a.clamp(max=threshold)
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

    s: per-input-channel scales, or None when the alpha search found that no smoothing gives the
    smallest error (the group is then left unsmoothed). alpha: the alpha used (None with s None).
    error: relative W8A8 output error of the group on the calibration samples (sum over its layers
    of ||Y_w8a8 - Y||^2 / ||Y||^2; None without samples). errors: error per candidate tried (search
    only; key None = unsmoothed).
    """

    s: torch.Tensor | None
    alpha: float | None
    searched: bool = False
    error: float | None = None
    errors: dict[float | None, float] = field(default_factory=dict)


class _GroupError:
    """W8A8 output error of a group on its calibration samples, for candidate scales.

    Per layer: the mean over sample tokens of ||y_w8a8 - y||^2 / ||x||^2, summed over the group.
    Normalising each token by its own input energy makes every token count alike: neither a few
    tokens with huge activations (BERT's [CLS]/[SEP]) nor tokens whose output happens to be near zero
    (where a relative output error explodes) decide alone. Reference outputs are computed once; a
    candidate costs one activation quantization and, per weight, one weight quantization and matmul.
    """

    def __init__(self, samples: torch.Tensor, weights: Sequence[torch.Tensor], absmax: torch.Tensor,
                 config: SmoothQuantConfig) -> None:  # fmt: skip
        self.x = samples.detach().float().cpu()
        self.weights = [w.detach().float().cpu() for w in weights]
        self.refs = [self.x @ w.t() for w in self.weights]
        self.norm = self.x.pow(2).sum(dim=1).clamp(min=1e-30)
        self.absmax = absmax
        self.config = config

    def __call__(self, s: torch.Tensor | None) -> float:
        cfg = self.config
        xs = self.x if s is None else self.x / s
        act = static_act_scale(self.absmax, s, cfg.outlier_threshold) if cfg.activation == "tensor" else None
        total = 0.0
        for w, ref in zip(self.weights, self.refs, strict=True):
            y = simulate_w8a8(xs, w if s is None else w * s, act, cfg.outlier_threshold)
            total += float(((y - ref).pow(2).sum(dim=1) / self.norm).mean())
        return total


def group_error(
    samples: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor | None, absmax: torch.Tensor,
    config: SmoothQuantConfig,
) -> float:  # fmt: skip
    """Relative W8A8 output error of a group with smoothing ``s`` (None: unsmoothed) on ``samples``."""
    with torch.inference_mode():
        return _GroupError(samples, weights, absmax, config)(s)


def choose_scale(
    stats: LayerStats, weights: Sequence[torch.Tensor], config: SmoothQuantConfig, alpha: float
) -> ScaleChoice:
    """s for a group of [N, K] weights sharing one input with statistics ``stats``.

    Fixed ``alpha``; or, with ``config.search_alpha`` and recorded samples, the candidate of
    ``config.alpha_grid`` (plus "no smoothing") with the smallest group error on the samples. Ties go
    to the alpha closest to ``alpha``.
    """
    wmax = weight_absmax(weights)
    has_samples = stats.samples is not None and stats.samples.shape[0] > 0
    with torch.inference_mode():
        if not config.search_alpha or not has_samples:
            s = smoothing_scale(stats.absmax, wmax, alpha)
            err = _GroupError(stats.samples, weights, stats.absmax, config)(s) if has_samples else None
            return ScaleChoice(s, alpha, False, err)
        measure = _GroupError(stats.samples, weights, stats.absmax, config)
        errors: dict[float | None, float] = {None: measure(None)}
        best: tuple[float, float, float | None, torch.Tensor | None] = (errors[None], 2.0, None, None)
        for a in config.alpha_grid:
            s = smoothing_scale(stats.absmax, wmax, a)
            errors[a] = measure(s)
            cand = (errors[a], abs(a - alpha), a, s)
            if cand[:2] < best[:2]:
                best = cand
    return ScaleChoice(best[3], best[2], True, best[0], errors)
