"""Integer formats: int8/int4, symmetric (absmax) or affine (scale + zero-point), with one scale per
tensor, per channel (either axis) or per group along the last (reduction) axis.

Symmetric codes lie in [-(2^(b-1)-1), 2^(b-1)-1] so the format is sign-symmetric; affine codes in
[0, 2^b-1] with the range widened to include 0, so 0.0 is exactly representable.
"""

from __future__ import annotations

import torch

from .scheme import Scheme


def _grouped(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, int]:
    """A 2-D fp32 view [units, unit_len] whose rows each share one scale; also the pad added."""
    x = w.float()
    if scheme.granularity == "tensor":
        return x.reshape(1, -1), 0
    if scheme.granularity == "channel":
        axis = scheme.axis % max(x.dim(), 1)
        return x.movedim(axis, 0).reshape(x.shape[axis], -1), 0
    k = x.shape[-1] if x.dim() else 1
    g = scheme.blocksize
    rows = x.reshape(-1, k)
    pad = (-k) % g
    if pad:
        # Padding with zeros cannot change a group's absmax or (0-including) min/max.
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(-1, g), pad


def scale_shape(shape: tuple[int, ...], scheme: Scheme) -> tuple[int, ...]:
    """Shape of the scale (and zero-point) tensor for a weight of ``shape``."""
    shape = tuple(shape) or (1,)  # a 0-d weight is quantized as one element
    if scheme.granularity == "tensor":
        return (1,)
    if scheme.granularity == "channel":
        return (shape[scheme.axis % len(shape)],)
    k = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return (rows, -(-k // scheme.blocksize))


def int_quantize(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return (codes, fp32 scale, uint8 zero-point or None) for ``w``.

    Codes come back in the weight's original element order, flattened: int8 values for symmetric,
    uint8 values for affine.
    """
    if w.dim() == 0:
        w = w.reshape(1)  # a 0-d weight is quantized as one element (codes are flat anyway)
    units, pad = _grouped(w, scheme)
    sshape = scale_shape(tuple(w.shape), scheme)
    if scheme.symmetric:
        absmax = units.abs().amax(dim=1)
        scale = absmax / scheme.qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(units / safe[:, None]), scheme.qmin, scheme.qmax).to(torch.int8)
        zp = None
    else:
        lo = units.amin(dim=1).clamp(max=0)
        hi = units.amax(dim=1).clamp(min=0)
        # hi/q - lo/q rather than (hi - lo)/q: the difference overflows for weights near the fp32 max.
        scale = hi / scheme.qmax - lo / scheme.qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zpf = torch.clamp(torch.round(-lo / safe), 0, scheme.qmax)
        q = torch.clamp(torch.round(units / safe[:, None]) + zpf[:, None], 0, scheme.qmax).to(torch.uint8)
        zp = zpf.to(torch.uint8).reshape(sshape)
    codes = _ungroup(q, w.shape, scheme, pad)
    return codes, scale.reshape(sshape), zp


def _ungroup(q: torch.Tensor, shape: torch.Size, scheme: Scheme, pad: int) -> torch.Tensor:
    if scheme.granularity == "tensor":
        return q.reshape(-1)
    if scheme.granularity == "channel":
        axis = scheme.axis % len(shape)
        moved = list(shape)
        moved.insert(0, moved.pop(axis))
        return q.reshape(moved).movedim(0, axis).reshape(-1)
    k = shape[-1]
    rows = q.reshape(-1, k + pad)
    return rows[:, :k].reshape(-1)


def int_decode(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, shape: tuple[int, ...], scheme: Scheme
) -> torch.Tensor:
    """fp32 weight of ``shape`` from flat codes (int8 symmetric / uint8 affine) and constants."""
    work = tuple(shape) or (1,)
    x = codes.reshape(work).float()
    if zero_point is not None:
        x = x - _broadcast(zero_point.float(), work, scheme)
    return (x * _broadcast(scale.float(), work, scheme)).reshape(shape)


def _broadcast(c: torch.Tensor, shape: tuple[int, ...], scheme: Scheme) -> torch.Tensor:
    """Expand per-unit constants to ``shape``."""
    if scheme.granularity == "tensor":
        return c.reshape(())
    if scheme.granularity == "channel":
        axis = scheme.axis % len(shape)
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return c.reshape(view)
    k = shape[-1]
    per_col = c.repeat_interleave(scheme.blocksize, dim=1)[:, :k]
    return per_col.reshape(shape)
