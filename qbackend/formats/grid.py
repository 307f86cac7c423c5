"""A weight's quantization grid spelled out per element: the arithmetic of :func:`quantize` on given scales.

GPTQ chooses the codes itself (and, with dynamic groups, the constants from the weight as updated),
then must store them in our ordinary formats. `ElementGrid` holds, for every element of a
``[N, K]`` weight, the constants its block/group/channel uses, in exactly the arithmetic of
:func:`~qbackend.formats.quantize`:

* NF4/FP4: blocks of ``blocksize`` over the row-major flattened weight (bitsandbytes' layout); full
  blocks multiply by ``1 / absmax``, the tail block divides by its (clamped) absmax; nearest code,
  ties to the lower one.
* int (per tensor / channel / group along K): ``round(w / scale)`` (+ zero point), clamped.

So :func:`grid_from_weight` followed by :meth:`ElementGrid.encode` gives the codes of round to
nearest bit for bit, and :meth:`ElementGrid.to_qweight` stores any codes chosen on the grid in the
format (nested constants computed afterwards from the stored block constants, as bitsandbytes does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codebooks import _sorted_midpoints_cpu, code_table, nearest_code
from .integer import _grouped, scale_shape
from .nested import nest_constants
from .packing import pack_4bit
from .qweight import QuantizedWeight
from .scheme import FormatError, Scheme


@dataclass
class ElementGrid:
    """Per-element constants of a ``[N, K]`` weight (views or full tensors, all ``[N, K]`` fp32).

    codebooks: ``absmax`` (stored block constant), ``inv`` (the multiplier of full blocks) and
    ``tail`` (bool: the element is in the tail block, which divides). int: ``scale`` and
    ``zero_point`` (None when symmetric).
    """

    scheme: Scheme
    absmax: torch.Tensor | None = None
    inv: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    @property
    def codebook(self) -> bool:
        return self.scheme.kind in ("nf4", "fp4")

    def columns(self, cols: slice | torch.Tensor) -> ElementGrid:
        """The grid of some columns (a slice or an index tensor)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, cols]

        return ElementGrid(self.scheme, pick(self.absmax), pick(self.inv), pick(self.tail), pick(self.scale),
                           pick(self.zero_point))  # fmt: skip

    def set_columns(self, cols: slice, other: ElementGrid) -> None:
        """Overwrite some columns with ``other``'s constants (dynamic groups)."""
        for key in ("absmax", "inv", "tail", "scale", "zero_point"):
            dst = getattr(self, key)
            if dst is not None:
                dst[:, cols] = getattr(other, key)

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, dequantized)`` of ``w`` (shaped like this grid, or one column of it as ``[N]``).

        codes: uint8 table indices (codebooks), int16 integers (int, zero point not subtracted).
        """
        w = w.float()
        if self.codebook:
            v = torch.where(self.tail, w / self.absmax, w * self.inv)  # type: ignore[arg-type]
            codes = _nearest_code(v.clamp(-1, 1), self.scheme.kind)
            deq = code_table(self.scheme.kind, w.device)[codes.long()] * self.absmax
            return codes, deq
        s = self.scheme
        safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))  # type: ignore[operator]
        if self.zero_point is None:
            q = torch.clamp(torch.round(w / safe), s.qmin, s.qmax)
            return q.to(torch.int16), q * self.scale
        q = torch.clamp(torch.round(w / safe) + self.zero_point, 0, s.qmax)
        return q.to(torch.int16), (q - self.zero_point) * self.scale

    def permuted(self, perm: torch.Tensor) -> ElementGrid:
        return self.columns(perm)

    def transposed(self) -> ElementGrid:
        """The same constants as ``[K, N]`` contiguous tensors (row ``j`` holds column ``j``'s: contiguous)."""

        def t(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.t().contiguous()

        return ElementGrid(self.scheme, t(self.absmax), t(self.inv), t(self.tail), t(self.scale), t(self.zero_point))

    def row(self, j: int) -> ElementGrid:
        """Row ``j``'s constants as 1-D views (of a transposed grid: one column of the weight)."""

        def r(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[j]

        return ElementGrid(self.scheme, r(self.absmax), r(self.inv), r(self.tail), r(self.scale), r(self.zero_point))

    def set_rows(self, rows: slice, other: ElementGrid) -> None:
        """Overwrite some rows with ``other``'s constants, given in the weight's ``[N, K]`` orientation."""
        for key in ("absmax", "inv", "tail", "scale", "zero_point"):
            dst = getattr(self, key)
            if dst is not None:
                dst[rows] = getattr(other, key).t()

    def to_qweight(self, codes: torch.Tensor, dtype: torch.dtype, name: str = "weight") -> QuantizedWeight:
        """Store ``codes`` (``[N, K]``, from :meth:`encode` on this grid) in the scheme's `QuantizedWeight`."""
        s = self.scheme
        n, k = codes.shape
        if self.codebook:
            absmax = self.absmax.reshape(-1)[:: s.blocksize].contiguous()  # type: ignore[union-attr]
            packed = pack_4bit(codes.reshape(-1).to(torch.uint8), pad_code=int(nearest_code(torch.zeros(1), s.kind)))
            scale, zp = absmax, None
        else:
            sshape = scale_shape((n, k), s)
            step = {"tensor": (slice(0, 1), slice(0, 1)), "channel": (slice(None), slice(0, 1)),
                    "block": (slice(None), slice(None, None, s.blocksize))}[s.granularity]  # fmt: skip
            if s.granularity == "channel" and s.axis % 2 == 1:
                step = (slice(0, 1), slice(None))
            scale = self.scale[step].reshape(sshape).contiguous()  # type: ignore[index]
            zp = None if self.zero_point is None else self.zero_point[step].reshape(sshape).to(torch.uint8)
            if s.bits == 4:
                u = codes + 8 if s.symmetric else codes
                packed = pack_4bit(u.reshape(-1).to(torch.uint8))
            else:
                packed = codes.reshape(-1).to(torch.int8 if s.symmetric else torch.uint8)
        nested = None
        if s.nested:
            try:
                nested = nest_constants(scale, s.nested_blocksize)
            except FormatError as e:
                raise FormatError(f"{name}: {e}") from None
            scale = None
        return QuantizedWeight(s, (n, k), dtype, packed.contiguous(), scale, zp, nested)


def _nearest_code(x: torch.Tensor, kind: str) -> torch.Tensor:
    """:func:`nearest_code` on the CPU as 15 compares with the midpoints (about 3x faster than bucketize
    there): the index is the number of midpoints below x, so ties go to the lower value as there."""
    if x.device.type != "cpu":
        return nearest_code(x, kind)
    mids, order = _sorted_midpoints_cpu(kind)
    idx = torch.zeros(x.shape, dtype=torch.uint8)
    for m in mids.tolist():  # fp32 values: the comparison is exact in x's fp32
        idx += x > m
    return order[idx.long()] if kind == "fp4" else idx


def grid_from_weight(w: torch.Tensor, scheme: Scheme) -> ElementGrid:
    """The round-to-nearest grid of a ``[N, K]`` weight: the constants :func:`quantize` would choose."""
    if w.dim() != 2:
        raise FormatError(f"calibrated quantization expects a [out, in] weight; got shape {tuple(w.shape)}")
    x = w.detach().float()
    n, k = x.shape
    if scheme.kind in ("nf4", "fp4"):
        bs = scheme.blocksize
        flat = x.reshape(-1)
        numel = flat.numel()
        full = numel - numel % bs
        nblocks = -(-numel // bs)
        am = torch.empty(nblocks, dtype=torch.float32, device=x.device)
        if full:
            am[: full // bs] = flat[:full].view(-1, bs).abs().amax(dim=1)
        if numel % bs:
            am[-1] = flat[full:].abs().amax().clamp(min=1e-38)  # bitsandbytes stores the clamped tail absmax
        inv_b = 1.0 / am.clamp(min=1e-38)
        idx = torch.arange(numel, device=x.device) // bs
        tail = (torch.arange(numel, device=x.device) >= full).view(n, k)
        return ElementGrid(scheme, absmax=am[idx].view(n, k), inv=inv_b[idx].view(n, k), tail=tail)
    units, _pad = _grouped(x, scheme)
    if scheme.symmetric:
        absmax = units.abs().amax(dim=1)
        scale, zp = absmax / scheme.qmax, None
    else:
        lo = units.amin(dim=1).clamp(max=0)
        hi = units.amax(dim=1).clamp(min=0)
        scale = hi / scheme.qmax - lo / scheme.qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(-lo / safe), 0, scheme.qmax)
    return ElementGrid(scheme, scale=_per_element(scale, (n, k), scheme),
                       zero_point=None if zp is None else _per_element(zp, (n, k), scheme))  # fmt: skip


def _per_element(c: torch.Tensor, shape: tuple[int, int], scheme: Scheme) -> torch.Tensor:
    n, k = shape
    if scheme.granularity == "tensor":
        return c.reshape(1, 1).expand(n, k).contiguous()
    if scheme.granularity == "channel":
        if scheme.axis % 2 == 0:
            return c.reshape(n, 1).expand(n, k).contiguous()
        return c.reshape(1, k).expand(n, k).contiguous()
    return c.reshape(n, -1).repeat_interleave(scheme.blocksize, dim=1)[:, :k].contiguous()
