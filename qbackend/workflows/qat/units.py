"""The "units" of a format: the sets of weight elements that share one scale.

Codebook (NF4/FP4) blocks run over the row-major flattened weight; int scales are per tensor, per
channel (along ``scheme.axis``) or per group along the last axis — exactly as
:mod:`qbackend.formats` lays them out. ``to_units`` views a weight as ``[units, unit_len]`` (zero
padded: zeros change no absmax and no 0-including min/max), ``from_units`` is its inverse.
"""

from __future__ import annotations

import torch

from ...formats import Scheme


def num_units(shape: tuple[int, ...], scheme: Scheme) -> int:
    """How many scales a weight of ``shape`` has in ``scheme`` (before nesting)."""
    numel = 1
    for d in shape:
        numel *= d
    if scheme.kind in ("nf4", "fp4"):
        return -(-numel // scheme.blocksize)
    if scheme.granularity == "tensor":
        return 1
    if scheme.granularity == "channel":
        return shape[scheme.axis % len(shape)]
    return (numel // shape[-1]) * -(-shape[-1] // scheme.blocksize)


def to_units(t: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``t`` as ``[units, unit_len]`` (a copy only where padding or axis moves require it)."""
    if scheme.kind in ("nf4", "fp4"):
        flat = t.reshape(-1)
        pad = (-flat.numel()) % scheme.blocksize
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        return flat.view(-1, scheme.blocksize)
    if scheme.granularity == "tensor":
        return t.reshape(1, -1)
    if scheme.granularity == "channel":
        axis = scheme.axis % t.dim()
        return t.movedim(axis, 0).reshape(t.shape[axis], -1)
    k = t.shape[-1]
    rows = t.reshape(-1, k)
    pad = (-k) % scheme.blocksize
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(-1, scheme.blocksize)


def from_units(u: torch.Tensor, shape: tuple[int, ...], scheme: Scheme) -> torch.Tensor:
    """Inverse of :func:`to_units` (drops the padding)."""
    numel = 1
    for d in shape:
        numel *= d
    if scheme.kind in ("nf4", "fp4") or scheme.granularity == "tensor":
        return u.reshape(-1)[:numel].reshape(shape)
    if scheme.granularity == "channel":
        axis = scheme.axis % len(shape)
        moved = list(shape)
        moved.insert(0, moved.pop(axis))
        return u.reshape(moved).movedim(0, axis)
    k = shape[-1]
    return u.reshape(-1, u.numel() // (numel // k))[:, :k].reshape(shape)


def unit_range(wf: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit (lo, hi) of fp32 ``wf`` as the format sees them: ``(-absmax, absmax)`` for symmetric
    formats, ``(min(min, 0), max(max, 0))`` for affine int."""
    u = to_units(wf, scheme)
    if scheme.kind == "int" and not scheme.symmetric:
        return u.amin(dim=1).clamp(max=0), u.amax(dim=1).clamp(min=0)
    a = u.abs().amax(dim=1)
    return -a, a


def expand_units(c: torch.Tensor, shape: tuple[int, ...], scheme: Scheme, unit_len: int) -> torch.Tensor:
    """Per-unit values ``c`` [units] broadcast to every element of a weight of ``shape``."""
    return from_units(c.reshape(-1, 1).expand(c.numel(), unit_len), shape, scheme)
