"""AWQ (Lin et al. 2023, activation-aware weight quantization): per-input-channel scales and per-group clipping.

Pure tensor functions on a ``[N, K]`` weight, its ``[K, K]`` Hessian ``H = mean(X^T X)`` and the
mean ``|x_j|`` of its inputs per channel (both recorded by ``qbackend.calibrate(..., hessian=True)``).

Scales: ``x @ W^T = (x / s) @ (W * s)^T`` for any positive s; scaling up the input channels that
carry large activations shrinks their relative rounding error. As in the paper and its reference
code: ``s = mean|x|^alpha`` normalised by ``sqrt(max(s) * min(s))``, alpha searched on a grid
(``alpha = i / grid``, i = 0 .. grid-1) for the lowest output error; alpha = 0 is s = 1, round to
nearest. With ``duo`` (AutoAWQ's default) the search tries s = 1 and ``mean|x|^alpha / w_mean^(1-alpha)``,
``w_mean`` the mean over output rows of ``|w| / max|w|`` of the weight's unit. The loss is the
layer's output error on every calibration token,
``tr(D H D^T)`` with ``D = W - Q(W * s) / s``, not a sample of tokens.

Clipping: per quantization unit (int4 group, NF4/FP4 block inside a row, int8 channel), the range is
shrunk by ``r = 1 - i / clip_grid`` (i < ``max_shrink * clip_grid``) where that lowers the unit's own
output error ``d_u H_uu d_u^T`` (r = 1 keeps it). A shrunk unit stores ``r`` times its constant
(absmax / scale; the zero point of an affine group is unchanged: clipping ``[lo, hi]`` to
``[r lo, r hi]`` keeps ``-lo / scale``), so the codes land on an ordinary grid of the scheme and the
result is a plain `QuantizedWeight` (nested constants computed afterwards).

The caller multiplies the layer's input by ``1 / s`` (:attr:`AWQResult.input_scale`) or folds it
into the op producing that input. The result is never worse than round to nearest on the
calibration inputs: otherwise round to nearest is kept (``kept_rtn``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .gptq import CalibrationDataError, output_error
from .grid import ElementGrid, grid_from_weight
from .qweight import QuantizedWeight, quantize
from .scheme import FormatError, Scheme


@dataclass(frozen=True)
class AWQResult:
    """qweight: the quantized ``W * s``; scale: s (fp32 ``[K]``, all ones when alpha = 0 or RTN was kept);
    input_scale: ``1 / s`` to multiply the input by, None when s is all ones; error / rtn_error: relative
    output error (as `GPTQResult`) of ``Q(W s) / s`` and of round to nearest; clipped: units whose range
    was shrunk; clip: whether the clip search ran (units inside rows or channels); duo: s divides by
    ``w_mean^(1 - alpha)`` too."""

    qweight: QuantizedWeight
    scale: torch.Tensor
    input_scale: torch.Tensor | None
    alpha: float
    error: float
    rtn_error: float
    clipped: int = 0
    clip: bool = True
    kept_rtn: bool = False
    duo: bool = False


def awq_scale(act_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``mean|x|^alpha`` (``/ w_mean^(1 - alpha)`` with ``w_mean``), clamped at 1e-4, normalised to a
    geometric mid-range of 1; fp32 ``[K]``. alpha = 0 without ``w_mean`` gives exactly ones."""
    if alpha == 0 and w_mean is None:
        return torch.ones(act_mean.numel(), dtype=torch.float32)
    s = act_mean.detach().double().cpu().clamp(min=1e-4).pow(alpha)
    if w_mean is not None:
        s = (s / (w_mean.detach().double().cpu().pow(1.0 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / math.sqrt(float(s.max()) * float(s.min()))
    return s.float()


def weight_mean(weights: list[torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """Per input channel, the mean over output rows of ``|w| / max|w|`` of its quantization unit (AutoAWQ's
    "duo" scaling statistic): large where a channel's weights are large within their group."""
    rows = []
    for w in weights:
        a = w.detach().float().abs()
        n, k = a.shape
        unit = clip_units(scheme, k) or k
        g = -(-k // unit)
        padded = torch.nn.functional.pad(a, (0, g * unit - k)).view(n, g, unit)
        rel = padded / (padded.amax(dim=2, keepdim=True) + 1e-6)
        rows.append(rel.view(n, g * unit)[:, :k])
    return torch.cat(rows).mean(dim=0).cpu()


def search_scale(
    weights: list[torch.Tensor], hessian: torch.Tensor, act_mean: torch.Tensor, scheme: Scheme, grid: int = 20,
    duo: bool = True,
) -> tuple[float, torch.Tensor, list[float], bool]:
    """``(alpha, s, losses, duo chosen)``: the alpha of the grid with the lowest summed output error ``tr(D H D^T)``
    of the weights (layers sharing one input share one s), round to nearest on ``W * s``. ``duo``: s = 1,
    then ``mean|x|^alpha / w_mean^(1 - alpha)`` (:func:`weight_mean`) for every alpha; else ``mean|x|^alpha``."""
    h = hessian.float()
    losses = []
    best = (math.inf, 0.0, torch.ones(act_mean.numel()), False)
    if duo:  # s = 1 (round to nearest), then the duo family (it won 36 of MiniLM's 37 layers over x-only)
        w_mean = weight_mean(weights, scheme)
        candidates = [(0.0, None)] + [(i / grid, w_mean) for i in range(grid)]
    else:
        candidates = [(i / grid, None) for i in range(grid)]
    for alpha, wm in candidates:
        s = awq_scale(act_mean, alpha, wm).to(h.device)
        loss = 0.0
        for w in weights:
            d = w.float() - _rtn(w.float() * s, scheme) / s
            loss += float(((d @ h) * d).sum(dtype=torch.float64))
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s, wm is not None)
    return best[1], best[2], losses, best[3]


def _rtn(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Round to nearest on the scheme's grid (no nesting): the search's stand-in for quantize()."""
    return grid_from_weight(w, scheme).encode(w)[1]


def clip_units(scheme: Scheme, k: int) -> int | None:
    """Columns per clipping unit when every unit lies inside one row (K for per-channel int), else None."""
    if scheme.granularity == "channel" and scheme.axis % 2 == 0:
        return k
    if scheme.granularity != "block":
        return None
    if scheme.kind in ("nf4", "fp4") and k % scheme.blocksize:
        return None  # codebook blocks run over the flattened weight: they straddle rows
    return scheme.blocksize


def shrunk(grid: ElementGrid, r: torch.Tensor) -> ElementGrid:
    """``grid`` with every unit's range times ``r`` (``[N, K]`` per element, constant per unit)."""
    if grid.codebook:
        return ElementGrid(grid.scheme, absmax=grid.absmax * r, inv=grid.inv / r, tail=grid.tail)  # type: ignore[operator]
    return ElementGrid(grid.scheme, scale=grid.scale * r, zero_point=grid.zero_point)  # type: ignore[operator]


def search_clip(
    w: torch.Tensor, s: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, grid: int = 20, max_shrink: float = 0.5
) -> tuple[ElementGrid, int]:
    """``(grid of W * s with each unit's best shrink, units shrunk)``; see the module docstring."""
    ws = w.float() * s
    n, k = ws.shape
    base = grid_from_weight(ws, scheme)
    unit = clip_units(scheme, k)
    if unit is None:
        return base, 0
    g = -(-k // unit)
    pad = g * unit - k
    h = torch.nn.functional.pad(hessian.float(), (0, pad, 0, pad))
    hb = torch.stack([h[i * unit : (i + 1) * unit, i * unit : (i + 1) * unit] for i in range(g)])  # [G, u, u]
    best_err = torch.full((n, g), math.inf)
    best_r = torch.ones(n, g)
    for i in range(max(1, int(max_shrink * grid))):
        r = 1.0 - i / grid
        deq = shrunk(base, torch.full_like(ws, r)).encode(ws)[1]
        d = torch.nn.functional.pad((ws - deq) / s, (0, pad)).view(n, g, unit)
        err = torch.einsum("ngu,guv,ngv->ng", d, hb, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    r_el = best_r.repeat_interleave(unit, dim=1)[:, :k]
    return shrunk(base, r_el), int((best_r < 1).sum())


def awq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    act_mean: torch.Tensor,
    scheme: Scheme,
    *,
    grid: int = 20,
    duo: bool = True,
    clip: bool = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    name: str = "weight",
    scale: torch.Tensor | None = None,
) -> AWQResult:
    """AWQ-quantize ``w`` (``[N, K]``) to ``scheme``: scale search, then clip search, then the RTN check.

    ``scale``: a fixed s (``[K]``, positive; e.g. searched jointly for the layers sharing one input and
    folded into the op producing it): no scale search and no RTN check, since the caller's input is
    already ``x / s`` (``alpha`` is then NaN: the caller knows how s was chosen).

    Raises `CalibrationDataError` (naming ``name``) for statistics that do not fit the weight,
    `FormatError` for a bad weight or option.
    """
    if w.dim() != 2:
        raise FormatError(f"{name}: AWQ expects a [out, in] weight; got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise FormatError(f"{name}: contains NaN/Inf values; fix or exclude this layer before quantizing")
    if not (isinstance(grid, int) and grid >= 1 and isinstance(clip_grid, int) and clip_grid >= 1):
        raise FormatError(f"{name}: AWQ grid and clip_grid must be ints >= 1; got {grid!r}, {clip_grid!r}")
    if not (isinstance(max_shrink, (int, float)) and 0 <= max_shrink < 1):
        raise FormatError(f"{name}: AWQ max_shrink must be in [0, 1); got {max_shrink!r}")
    n, k = w.shape
    if tuple(hessian.shape) != (k, k) or act_mean.numel() != k:
        raise CalibrationDataError(
            f"{name}: the calibration's statistics are for {act_mean.numel()} inputs but the weight has {k}; "
            "calibrate this model again"
        )
    if not (bool(torch.isfinite(hessian).all()) and bool(torch.isfinite(act_mean).all())):
        raise CalibrationDataError(
            f"{name}: the calibration's statistics hold NaN/Inf; calibrate again on finite inputs"
        )
    W = w.detach().float()
    H = hessian.detach().float().to(W.device)
    if scale is None:
        alpha, s, _, by_weight = search_scale([W], H, act_mean.to(W.device), scheme, grid, duo)
    else:
        s = scale.detach().float().reshape(-1)
        if s.numel() != k or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise FormatError(f"{name}: a fixed AWQ scale must be {k} finite positive values")
        alpha, by_weight = math.nan, False
    s = s.to(W.device)
    if clip:
        g, clipped = search_clip(W, s, H, scheme, clip_grid, max_shrink)
    else:
        g, clipped = grid_from_weight(W * s, scheme), 0
    codes, _ = g.encode(W * s)
    qweight = g.to_qweight(codes, w.dtype, name)
    error = output_error(W, qweight.dequantize(torch.float32) / s, H)
    rtn = quantize(w, scheme, name=name)
    rtn_error = output_error(W, rtn.dequantize(torch.float32), H)
    did_clip = clip and clip_units(scheme, k) is not None
    if scale is None and rtn_error < error:
        ones = torch.ones(k, dtype=torch.float32)
        return AWQResult(rtn, ones, None, 0.0, rtn_error, rtn_error, 0, did_clip, kept_rtn=True)
    input_scale = None if bool((s == 1).all()) else (1.0 / s).float()
    return AWQResult(qweight, s.float(), input_scale, alpha, error, rtn_error, clipped, did_clip, duo=by_weight)
