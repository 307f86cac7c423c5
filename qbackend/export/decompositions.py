"""Our custom ops as plain aten ops, for exporters that cannot lower ``torch.ops.qbackend.*`` (torch-mlir).

Each function computes exactly what :mod:`qbackend.kernels.reference` computes for one kernel stem,
reading the op's arguments by the names of its family description (:mod:`qbackend.kernels.families`),
using only ops that lower in every torch-mlir output type (linalg-on-tensors, tosa, stablehlo; see
shared/notes/torch-compile.md):

* packed weights stay integer constants; nibbles are unpacked with
  ``bitwise_right_shift(q, full((), 4))`` and ``bitwise_and(q, 15)``. Not ``q >> 4`` (fails
  tosa/stablehlo), not ``torch.div(..., rounding_mode="floor")`` (segfaults the importer). The
  bytes are shifted as they are (uint8), except for tosa, which rejects a ui8 shift constant: there
  they are widened to int32 first (stablehlo would constant-fold that widening into a 4x larger
  copy of the codes, so it is not done everywhere). Masking after the shift makes the result right
  whether a backend shifts arithmetically or logically, and whether it sign- or zero-extends.
* code tables are gathered by integer index; integer zero points are subtracted in int32;
* W8A8 is a real ``torch._int_mm`` (int8 x int8 -> int32), rescaled in fp32 afterwards; with
  outlier columns (``w8a8_outlier_linear``) they are picked by a mask, not by index, so the graph
  has no data-dependent shapes.

Grad-input ops are not listed: an export is an inference graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import FAMILIES, OpFamily, linear_op
from ..kernels.spec import Args


def _unpack_nibbles(codes: Tensor, numel: int, work_dtype: torch.dtype) -> Tensor:
    """int32 [numel] 4-bit codes; the first element of each byte is in its high nibble."""
    q = codes.reshape(-1)
    if q.dtype != work_dtype:
        q = q.to(work_dtype)
    four = torch.full((), 4, dtype=work_dtype, device=codes.device)
    hi = torch.bitwise_and(torch.bitwise_right_shift(q, four), 15)
    lo = torch.bitwise_and(q, 15)
    return torch.stack([hi, lo], dim=-1).reshape(-1)[:numel].to(torch.int32)


def _scale_blocks(values: Tensor, scales: Tensor, blocksize: int) -> Tensor:
    """``values[i] * scales[i // blocksize]`` for flat ``values`` (a partial tail block allowed)."""
    numel = values.numel()
    nblocks = scales.numel()
    pad = nblocks * blocksize - numel
    if pad:
        values = F.pad(values, (0, pad))
    return (values.reshape(nblocks, blocksize) * scales.reshape(nblocks, 1)).reshape(-1)[:numel]


def _finish(x: Tensor, y: Tensor, bias: Tensor | None) -> Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def codebook(work_dtype: torch.dtype, a: Args) -> Tensor:
    """nf4 / fp4: ``table[code] * absmax[block]``, the constants plain or nested."""
    absmax = a.absmax
    if a.nested_codes is not None:
        centred = a.nested_table[a.nested_codes.reshape(-1).to(torch.int64)]
        absmax = _scale_blocks(centred, a.nested_absmax, a.nested_blocksize) + a.nested_offset.reshape(())
    idx = _unpack_nibbles(a.codes, a.out_features * a.in_features, work_dtype).to(torch.int64)
    w = _scale_blocks(a.table[idx], absmax, a.blocksize).reshape(a.out_features, a.in_features)
    return _finish(a.x, torch.matmul(a.x.float(), w.t()), a.bias)


def int4(work_dtype: torch.dtype, a: Args) -> Tensor:
    """int4: ``(code - zero_point) * scale[group]`` (zero point 8 when absent)."""
    n, k, groupsize = a.out_features, a.in_features, a.groupsize
    groups = -(-k // groupsize)
    q = _unpack_nibbles(a.codes, n * k, work_dtype).reshape(n, k)
    if groups * groupsize != k:
        q = F.pad(q, (0, groups * groupsize - k))
    q = q.reshape(n, groups, groupsize)
    if a.zero_point is None:
        q = q - 8
    else:
        q = q - a.zero_point.reshape(n, groups, 1).to(torch.int32)
    w = (q.to(torch.float32) * a.scale.float().reshape(n, groups, 1)).reshape(n, groups * groupsize)[:, :k]
    return _finish(a.x, torch.matmul(a.x.float(), w.t()), a.bias)


def int8(a: Args) -> Tensor:
    """int8: scale the output columns, not the weight (the int8 codes are the only weight tensor)."""
    w = a.codes.reshape(a.out_features, a.in_features).to(torch.float32)
    y = torch.matmul(a.x.float(), w.t()) * a.scale.float().reshape(a.out_features)
    return _finish(a.x, y, a.bias)


def _w8a8(x: Tensor, a: Args) -> Tensor:
    """W8A8 of ``x`` (the op's input, or its outlier-free part) with the weight of ``a``."""
    n, k = a.out_features, a.in_features
    xf = x.float().reshape(-1, k)
    if a.act_scale is None:
        s_x = xf.abs().amax(dim=1, keepdim=True) / 127.0
    else:
        s_x = a.act_scale.float().reshape(1, 1)
    safe = torch.where(s_x > 0, s_x, torch.ones_like(s_x))
    xq = torch.clamp(torch.round(xf / safe), -127, 127).to(torch.int8)
    acc = torch._int_mm(xq, a.codes.reshape(n, k).t())
    y = acc.to(torch.float32) * s_x * a.scale.float().reshape(1, n)
    if a.bias is not None:
        y = y + a.bias.float()
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def w8a8(a: Args) -> Tensor:
    """W8A8: a real int8 x int8 -> int32 matmul, rescaled in fp32."""
    return _w8a8(a.x, a)


def w8a8_outlier(a: Args) -> Tensor:
    """W8A8 with outlier columns picked by a mask (no data-dependent shapes)."""
    # Columns with any |x| >= threshold: zeroed for the int8 GEMM, multiplied in float against the
    # int8 codes (the other columns are zero there), rescaled per output channel.
    n, k = a.out_features, a.in_features
    xf = a.x.float().reshape(-1, k)
    cols = (xf.amax(dim=0) >= a.threshold) | (xf.amin(dim=0) <= -a.threshold)
    zero = torch.zeros((), dtype=xf.dtype, device=xf.device)
    y = _w8a8(torch.where(cols, zero, xf), a)
    w = a.codes.reshape(n, k).to(torch.float32)
    y = y + torch.matmul(torch.where(cols, xf, zero), w.t()) * a.scale.float().reshape(1, n)
    return y.reshape(*a.x.shape[:-1], n).to(a.x.dtype)


def _from_description(family: OpFamily, fn: Callable[[Args], Tensor]) -> Callable[..., Tensor]:
    """The op's decomposition: its arguments bound by name from the family description, then ``fn``."""

    def decomposition(*args: object, **kwargs: object) -> Tensor:
        return fn(family.bind(args, kwargs))

    return decomposition


def decomposition_table(output_type: str = "linalg-on-tensors") -> dict[torch._ops.OperatorBase, Callable[..., Tensor]]:
    """``{torch.ops.qbackend.<op>.default: aten implementation}`` for ``ExportedProgram.run_decompositions``.

    One entry per op family (see :data:`qbackend.kernels.FAMILIES`), chosen by its kernel stem.
    ``output_type``: the torch-mlir output type the graph is for (only tosa changes anything).
    """
    work = torch.int32 if output_type == "tosa" else torch.uint8
    by_kernel: dict[str, Callable[[Args], Tensor]] = {
        "codebook": functools.partial(codebook, work),
        "int4": functools.partial(int4, work),
        "int8": int8,
        "w8a8": w8a8,
        "w8a8_outlier": w8a8_outlier,
    }
    return {linear_op(name): _from_description(f, by_kernel[f.kernel]) for name, f in FAMILIES.items()}
