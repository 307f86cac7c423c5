"""GPTQ (Frantar et al. 2022): round a weight column by column, spreading each column's rounding error
over the columns not yet rounded with the inverse Hessian of the layer's inputs, ``H = mean(X^T X)``.

Pure tensor functions on a ``[N, K]`` weight and its ``[K, K]`` Hessian; codes land on the grid of
:mod:`.grid`, so the result is an ordinary `QuantizedWeight` of the scheme (NF4/FP4 blocks along the
flattened row as bitsandbytes lays them out, nested constants computed afterwards; int4 groups;
int8 per channel) that every kernel, save/load and the bitsandbytes export read unchanged.

The algorithm, as in the reference implementation: dampening (``damp * mean(diag H)`` on the
diagonal), dead inputs (a zero diagonal: the column's error is not spread), optional act-order
(columns in order of decreasing ``diag H``), the upper Cholesky factor of ``H^-1``, and lazy batch
updates (rounding inside blocks of ``block`` columns, one matrix product per block for the rest).

Group constants: "dynamic" (the default where the layout allows it: no act-order, blocks inside
rows) computes each block's/group's constants when its first column is reached, from the weight as
updated so far; "static" computes them all from the original weight first (act-order needs this,
since the layout's groups are contiguous in the original column order). With an identity Hessian no
error is spread, so both give round-to-nearest exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .blockwise import single_threaded
from .grid import ElementGrid, grid_from_weight
from .qweight import QuantizedWeight, quantize
from .scheme import FormatError, Scheme


class CalibrationDataError(FormatError):
    """The calibration data cannot drive a calibrated method for this layer (names the layer, says what to do)."""


@dataclass(frozen=True)
class GPTQResult:
    """The quantized weight, with what the report shows: relative output error of GPTQ and of
    round-to-nearest on the calibration inputs (``sqrt(tr(D H D^T) / tr(W H W^T))``, D = W - deq).
    ``kept_rtn``: GPTQ's greedy rounding came out worse than round to nearest on these inputs (it can,
    on tiny or nearly diagonal problems), so the round-to-nearest weight was kept."""

    qweight: QuantizedWeight
    error: float
    rtn_error: float
    kept_rtn: bool = False


def prepare_hessian(hessian: torch.Tensor, k: int, damp: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(damped float64 H, dead-input mask)``; `CalibrationDataError` for a wrong shape or no signal."""
    if tuple(hessian.shape) != (k, k):
        raise CalibrationDataError(
            f"{name}: the calibration's X^T X is {tuple(hessian.shape)} but the weight has {k} inputs; "
            "calibrate this model again"
        )
    h = hessian.detach().double().clone()
    if not bool(torch.isfinite(h).all()):
        raise CalibrationDataError(f"{name}: the calibration's X^T X holds NaN/Inf; calibrate again on finite inputs")
    diag = torch.diagonal(h)
    dead = diag <= 0
    if bool(dead.all()):
        raise CalibrationDataError(
            f"{name}: every calibration input of this layer was zero; calibrate on real data or exclude the layer"
        )
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1.0
    diag += damp * float(diag[~dead].mean())
    return h, dead


def output_error(w: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X (W - deq)^T|| / ||X W^T||`` over the calibration inputs, from ``H = mean(X^T X)``."""
    h = hessian.float()
    d = w.float() - deq.float()
    num = float(((d @ h) * d).sum(dtype=torch.float64))
    den = float(((w.float() @ h) * w.float()).sum(dtype=torch.float64))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else math.sqrt(max(num, 0.0))


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    groups: str = "auto",
    name: str = "weight",
) -> GPTQResult:
    """GPTQ-quantize ``w`` (``[N, K]``) to ``scheme`` with ``hessian`` (``[K, K]``, mean ``X^T X``).

    groups: "auto" (dynamic where possible), "dynamic" or "static" (see the module docstring).
    The result is never worse than round to nearest on the calibration inputs (see `GPTQResult`).
    Raises `CalibrationDataError` (naming ``name``) for a Hessian that does not fit or is not positive
    definite after dampening, `FormatError` for a bad weight or option.
    """
    if w.dim() != 2:
        raise FormatError(f"{name}: GPTQ expects a [out, in] weight; got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise FormatError(f"{name}: contains NaN/Inf values; fix or exclude this layer before quantizing")
    if not (isinstance(damp, (int, float)) and damp >= 0):
        raise FormatError(f"{name}: damp must be a number >= 0; got {damp!r}")
    if groups not in ("auto", "dynamic", "static"):
        raise FormatError(f"{name}: groups must be 'auto', 'dynamic' or 'static'; got {groups!r}")
    n, k = w.shape
    perm, hinv = hessian_factor(hessian, k, damp, act_order, name)
    W = w.detach().float().clone()
    grid = grid_from_weight(W, scheme)
    group = _dynamic_group(scheme, k)
    dynamic = group is not None and not act_order and groups != "static"
    if groups == "dynamic" and not dynamic:
        raise FormatError(f"{name}: dynamic groups need act_order=False and blocks inside rows ({scheme.name}, K={k})")
    if dynamic:
        block = max(block, group) // group * group  # a group never straddles two lazy blocks
    if perm is not None:
        W, grid = W[:, perm], grid.permuted(perm)
    # Column j of W is row j of Wt: every per-column step reads and writes contiguous memory.
    Wt, gt = W.t().contiguous(), grid.transposed()
    codes_t = torch.empty(k, n, dtype=torch.int16 if not grid.codebook else torch.uint8)
    with single_threaded():  # per-column ops are small: threads cost more than they give
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            W1 = Wt[i1:i2].clone()
            err1 = torch.empty_like(W1)
            hinv1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if dynamic and col % group == 0:  # type: ignore[operator]
                    j = min(i + group, i2 - i1)  # type: ignore[operator]
                    gt.set_rows(slice(col, i1 + j), grid_from_weight(W1[i:j].t(), scheme))
                c, q = gt.row(col).encode(W1[i])
                codes_t[col] = c
                e = (W1[i] - q) / hinv1[i, i]
                W1[i:].addr_(hinv1[i, i:], e, alpha=-1.0)
                err1[i] = e
            if i2 < k:
                Wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)
    codes, grid = codes_t.t(), gt.transposed()
    if perm is not None:
        inv = torch.argsort(perm)
        codes, grid = codes[:, inv], grid.permuted(inv)
    qweight = grid.to_qweight(codes, w.dtype, name)
    error = output_error(w, qweight.dequantize(torch.float32), hessian)
    rtn = quantize(w, scheme, name=name)
    rtn_error = output_error(w, rtn.dequantize(torch.float32), hessian)  # as stored: nested constants decoded
    if rtn_error < error:
        return GPTQResult(rtn, rtn_error, rtn_error, kept_rtn=True)
    return GPTQResult(qweight, error, rtn_error)


def _dynamic_group(scheme: Scheme, k: int) -> int | None:
    """Columns per group when each group lies inside one row (so it can be set when reached), else None."""
    if scheme.granularity != "block":
        return None
    if scheme.kind in ("nf4", "fp4") and k % scheme.blocksize:
        return None  # codebook blocks run over the flattened weight: they straddle rows
    return scheme.blocksize


#: hessian -> {(damp, act_order): (perm, factor)}: layers reading one input (q/k/v) share one factorisation
_factors: WeakIdKeyDictionary = WeakIdKeyDictionary()


def hessian_factor(
    hessian: torch.Tensor, k: int, damp: float, act_order: bool, name: str
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(column order or None, upper Cholesky factor of the damped H^-1 in that order)`` (fp32), memoised
    per Hessian tensor (the calibration's tensors are not modified in place)."""
    per = _factors.get(hessian)
    if per is None:
        per = _factors[hessian] = {}
    key = (float(damp), bool(act_order), k)
    if key not in per:
        h, _dead = prepare_hessian(hessian, k, damp, name)
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
        if perm is not None:
            h = h[perm][:, perm]
        per[key] = (perm, _inverse_cholesky(h, damp, name))
    return per[key]


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` (fp32, as the reference; float64 if fp32 fails); `CalibrationDataError`
    when H is not positive definite."""
    for dtype in (torch.float32, torch.float64):
        lower, info = torch.linalg.cholesky_ex(h.to(dtype))
        if int(info) != 0:
            continue
        hinv = torch.cholesky_inverse(lower)
        upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
        if int(info) == 0 and bool(torch.isfinite(upper).all()):
            return upper.float()
    raise CalibrationDataError(
        f"{name}: the calibration's X^T X is singular even with damp={damp:g}; raise damp (e.g. 0.1) or "
        "calibrate on more, varied tokens"
    )


def grid_error(w: torch.Tensor, grid: ElementGrid, hessian: torch.Tensor) -> float:
    """Relative output error of rounding ``w`` to nearest on ``grid`` (for reports and tests)."""
    return output_error(w, grid.encode(w.float())[1], hessian)
