"""HQQ (Badri & Shaji 2023, half-quadratic quantization): calibration-free refinement of 4-bit constants.

No data: the constants of every quantization unit are chosen to minimise an lp-norm (p < 1) of the
unit's weight error, ``sum |W - deq|^p``. Such a norm tolerates a few large errors (outliers) in
exchange for small errors elsewhere. HQQ's half-quadratic splitting adds an auxiliary error
``E`` and alternates, for ``iters`` rounds with ``beta`` growing by ``kappa`` each round:

* codes: round to nearest on the current constants;
* ``E = shrink_p(W - deq, beta)`` (the lp proximal step: errors below ``beta^(-1 / (2 - p))`` become 0);
* constants: the least-squares fit of the codes to ``W - E``;

stopping early once a round improves no unit (as HQQ's own solver stops once its error stops falling).

HQQ's own formulation refines a float zero point with the scale fixed. Our int4 format stores an
integer zero point (uint8, as every int4 kernel and checkpoint reads it), so the fit here updates the
scale and the zero point together (a line fit, the zero rounded to the format's grid, then the scale
refitted for it; symmetric formats: the scale alone). NF4/FP4 have a fixed codebook and one absmax
per block: the analogue refines each block's stored absmax (the fit of ``table[code] * absmax``;
a smaller one clips the block's largest values to +-1). Units are scored by the lp objective at
every round and the best constants seen are kept, the round-to-nearest ones included, so the result
is never worse than round to nearest on that objective (it can be worse on any other measure).

The result is a plain `QuantizedWeight` of the same scheme (nested constants computed afterwards):
kernels, save/load and the bitsandbytes export read it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codebooks import code_table
from .grid import ElementGrid, _per_element, grid_from_weight
from .integer import _grouped
from .qweight import QuantizedWeight, quantize
from .scheme import FormatError, Scheme, check_weight

#: formats the solver refines (int8's rounding error is already far below a 4-bit format's)
HQQ_FORMATS: tuple[str, ...] = ("nf4", "fp4", "int4")


@dataclass(frozen=True)
class HQQResult:
    """qweight: the refined weight; objective / rtn_objective: ``sum |W - deq|^p`` of it and of round to
    nearest; error / rtn_error: relative Frobenius weight error ``||W - deq|| / ||W||`` of both (all four
    on the stored weights: with nested constants, after nesting); changed: units whose constants moved
    from round to nearest's; units: their number."""

    qweight: QuantizedWeight
    objective: float
    rtn_objective: float
    error: float
    rtn_error: float
    changed: int
    units: int


def check_hqq_scheme(scheme: Scheme, name: str) -> None:
    """`FormatError` naming ``name`` for a format the solver does not refine."""
    if scheme.format not in HQQ_FORMATS:
        raise FormatError(
            f"{name}: method 'hqq' refines {', '.join(HQQ_FORMATS)} only; got {scheme.name} (use method 'rtn', "
            "'gptq' or 'awq' for it, or exclude the layer)"
        )


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """HQQ's generalised soft threshold: the proximal step of ``|x|^p`` at ``beta``."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * (x.abs() + 1e-8).pow(p - 1))


def hqq_quantize(
    w: torch.Tensor,
    scheme: Scheme,
    *,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    name: str = "weight",
) -> HQQResult:
    """HQQ-refine the constants of ``w`` (``[N, K]``) in ``scheme`` (see the module docstring).

    Raises `FormatError` naming ``name`` for a format it does not refine (:data:`HQQ_FORMATS`), a bad
    weight (NaN/Inf, not 2-D) or bad options.
    """
    check_hqq_scheme(scheme, name)
    if w.dim() != 2:
        raise FormatError(f"{name}: HQQ expects a [out, in] weight; got shape {tuple(w.shape)}")
    check_weight(w, name)
    if not (0 < lp_norm <= 1) or beta <= 0 or kappa < 1 or not isinstance(iters, int) or iters < 0:
        raise FormatError(f"{name}: HQQ needs 0 < lp_norm <= 1, beta > 0, kappa >= 1 and iters >= 0; got "
                          f"{lp_norm!r}, {beta!r}, {kappa!r}, {iters!r}")  # fmt: skip
    W = w.detach().float()
    units = _CodebookUnits(W, scheme) if scheme.kind in ("nf4", "fp4") else _IntUnits(W, scheme)
    grid = units.rtn
    codes, deq = grid.encode(W)
    best_obj = rtn_obj = units.objective(W - deq, lp_norm)  # per unit
    best = units.constants(grid)
    b = beta
    for _ in range(iters):
        target = W - shrink_lp(W - deq, b, lp_norm)
        b *= kappa
        cand = units.fit(codes, target, units.constants(grid))
        grid = units.grid(cand)
        codes, deq = grid.encode(W)
        obj = units.objective(W - deq, lp_norm)
        better = obj < best_obj
        if not bool(better.any()):  # as HQQ's own solver: stop once a round improves nothing
            break
        best = tuple(torch.where(better, c, o) for c, o in zip(cand, best, strict=True))
        best_obj = torch.minimum(obj, best_obj)
    final = units.grid(best)
    codes, _ = final.encode(W)
    qweight = final.to_qweight(codes, w.dtype, name)
    rtn = quantize(w, scheme, name=name)
    # reported on the stored weights (nested constants included, which the search does not see)
    deq, rtn_deq = qweight.dequantize(torch.float32), rtn.dequantize(torch.float32)
    norm = float(W.norm()) or 1.0
    moved = sum((c != r) for c, r in zip(best, units.constants(units.rtn), strict=True))
    obj, obj_rtn = (float(units.objective(W - d, lp_norm).sum()) for d in (deq, rtn_deq))
    err, err_rtn = (float((W - d).norm()) / norm for d in (deq, rtn_deq))
    return HQQResult(qweight, obj, obj_rtn, err, err_rtn, int((moved > 0).sum()), int(rtn_obj.numel()))


class _IntUnits:
    """Groups / channels of an int scheme: constants ``(scale, zero point)`` per unit, shape ``[U]``."""

    def __init__(self, w: torch.Tensor, scheme: Scheme) -> None:
        self.scheme, self.shape = scheme, tuple(w.shape)
        self.rtn = grid_from_weight(w, scheme)
        self.count = _grouped(torch.ones_like(w), scheme)[0].sum(dim=1)

    def units(self, x: torch.Tensor) -> torch.Tensor:
        return _grouped(x, self.scheme)[0]  # [U, L], zero-padded

    def objective(self, d: torch.Tensor, p: float) -> torch.Tensor:
        return self.units(d).abs().pow(p).sum(dim=1)

    def constants(self, grid: ElementGrid) -> tuple[torch.Tensor, ...]:
        scale = self._per_unit(grid.scale)
        zp = torch.zeros_like(scale) if grid.zero_point is None else self._per_unit(grid.zero_point)
        return scale, zp

    def _per_unit(self, per_element: torch.Tensor) -> torch.Tensor:
        # every real element of a unit holds its constant (>= 0); the zero padding cannot exceed it
        return self.units(per_element).amax(dim=1)

    def grid(self, c: tuple[torch.Tensor, ...]) -> ElementGrid:
        scale, zp = c
        s = self.scheme
        return ElementGrid(s, scale=_per_element(scale, self.shape, s),
                           zero_point=None if s.symmetric else _per_element(zp, self.shape, s))  # fmt: skip

    def fit(self, codes: torch.Tensor, target: torch.Tensor, old: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Least-squares ``target ~ scale * (code - zp)`` per unit, zp on the format's integer grid."""
        s = self.scheme
        scale0, zp0 = old
        q = self.units(codes.float())
        t = self.units(target)
        n = self.count
        if s.symmetric:
            qq = (q * q).sum(dim=1)
            scale = (q * t).sum(dim=1) / qq.clamp(min=1e-30)
            return _kept(scale, scale0, qq > 0), zp0
        sq, st = q.sum(dim=1), t.sum(dim=1)
        var = (q * q).sum(dim=1) - sq * sq / n
        slope = ((q * t).sum(dim=1) - sq * st / n) / var.clamp(min=1e-30)
        ok = (var > 1e-12) & (slope > 0)
        intercept = (st - slope * sq) / n
        zp = torch.clamp(torch.round(-intercept / torch.where(ok, slope, torch.ones_like(slope))), 0, s.qmax)
        zp = torch.where(ok, zp, zp0)
        # padded elements hold code 0 and target 0: subtract their (0 - zp) terms from the sums
        pad = q.shape[1] - n
        qz = q - zp[:, None]
        den = (qz * qz).sum(dim=1) - pad * zp * zp
        num = (qz * t).sum(dim=1)
        scale = num / den.clamp(min=1e-30)
        return _kept(scale, scale0, den > 0), zp


class _CodebookUnits:
    """NF4/FP4 blocks over the flattened weight: one stored absmax per block, shape ``[B]``."""

    def __init__(self, w: torch.Tensor, scheme: Scheme) -> None:
        self.scheme, self.shape = scheme, tuple(w.shape)
        self.rtn = grid_from_weight(w, scheme)
        bs, numel = scheme.blocksize, w.numel()
        self.pad = (-numel) % bs
        self.idx = torch.arange(numel) // bs
        self.table = code_table(scheme.kind, w.device)

    def units(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x.reshape(-1), (0, self.pad)).view(-1, self.scheme.blocksize)

    def objective(self, d: torch.Tensor, p: float) -> torch.Tensor:
        return self.units(d).abs().pow(p).sum(dim=1)

    def constants(self, grid: ElementGrid) -> tuple[torch.Tensor, ...]:
        return (grid.absmax.reshape(-1)[:: self.scheme.blocksize].clone(),)  # type: ignore[union-attr]

    def grid(self, c: tuple[torch.Tensor, ...]) -> ElementGrid:
        (am,) = c
        n, k = self.shape
        el = am[self.idx].view(n, k)
        inv = (1.0 / am.clamp(min=1e-38))[self.idx].view(n, k)
        return ElementGrid(self.scheme, absmax=el, inv=inv, tail=self.rtn.tail)

    def fit(self, codes: torch.Tensor, target: torch.Tensor, old: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Least-squares ``target ~ table[code] * absmax`` per block."""
        v = self.units(self.table[codes.long()])
        t = self.units(target)
        vv = (v * v).sum(dim=1)
        am = (v * t).sum(dim=1) / vv.clamp(min=1e-30)
        return (_kept(am, old[0], vv > 0),)


def _kept(new: torch.Tensor, old: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``new`` where it is a usable positive constant (and ``ok``), else ``old``."""
    good = ok & torch.isfinite(new) & (new > 0)
    return torch.where(good, new, old)
