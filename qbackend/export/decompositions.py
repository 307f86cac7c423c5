"""Our custom ops as plain aten ops, for exporters that cannot lower ``torch.ops.qbackend.*`` (torch-mlir).

Each function computes exactly what :mod:`qbackend.kernels.reference` computes, using only ops that
lower in every torch-mlir output type (linalg-on-tensors, tosa, stablehlo; see
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


def codebook4_linear(
    work_dtype: torch.dtype,
    x: Tensor,
    codes: Tensor,
    absmax: Tensor | None,
    nested_codes: Tensor | None,
    nested_absmax: Tensor | None,
    nested_offset: Tensor | None,
    table: Tensor,
    nested_table: Tensor | None,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    nested_blocksize: int,
) -> Tensor:
    if nested_codes is not None:
        assert nested_absmax is not None and nested_offset is not None and nested_table is not None
        centred = nested_table[nested_codes.reshape(-1).to(torch.int64)]
        absmax = _scale_blocks(centred, nested_absmax, nested_blocksize) + nested_offset.reshape(())
    assert absmax is not None
    idx = _unpack_nibbles(codes, out_features * in_features, work_dtype).to(torch.int64)
    w = _scale_blocks(table[idx], absmax, blocksize).reshape(out_features, in_features)
    return _finish(x, torch.matmul(x.float(), w.t()), bias)


def int4_linear(
    work_dtype: torch.dtype,
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    groupsize: int,
) -> Tensor:
    n, k = out_features, in_features
    groups = -(-k // groupsize)
    q = _unpack_nibbles(codes, n * k, work_dtype).reshape(n, k)
    if groups * groupsize != k:
        q = F.pad(q, (0, groups * groupsize - k))
    q = q.reshape(n, groups, groupsize)
    if zero_point is None:
        q = q - 8
    else:
        q = q - zero_point.reshape(n, groups, 1).to(torch.int32)
    w = (q.to(torch.float32) * scale.float().reshape(n, groups, 1)).reshape(n, groups * groupsize)[:, :k]
    return _finish(x, torch.matmul(x.float(), w.t()), bias)


def int8_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_features: int, in_features: int
) -> Tensor:
    # Scale the output columns, not the weight: the int8 codes are the only weight tensor.
    w = codes.reshape(out_features, in_features).to(torch.float32)
    y = torch.matmul(x.float(), w.t()) * scale.float().reshape(out_features)
    return _finish(x, y, bias)


def w8a8_linear(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    act_scale: Tensor | None,
    out_features: int,
    in_features: int,
) -> Tensor:
    xf = x.float().reshape(-1, in_features)
    if act_scale is None:
        s_x = xf.abs().amax(dim=1, keepdim=True) / 127.0
    else:
        s_x = act_scale.float().reshape(1, 1)
    safe = torch.where(s_x > 0, s_x, torch.ones_like(s_x))
    xq = torch.clamp(torch.round(xf / safe), -127, 127).to(torch.int8)
    acc = torch._int_mm(xq, codes.reshape(out_features, in_features).t())
    y = acc.to(torch.float32) * s_x * scale.float().reshape(1, out_features)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)


def w8a8_outlier_linear(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    act_scale: Tensor | None,
    threshold: float,
    out_features: int,
    in_features: int,
) -> Tensor:
    # Columns with any |x| >= threshold: zeroed for the int8 GEMM, multiplied in float against the
    # int8 codes (the other columns are zero there), rescaled per output channel.
    xf = x.float().reshape(-1, in_features)
    cols = (xf.amax(dim=0) >= threshold) | (xf.amin(dim=0) <= -threshold)
    zero = torch.zeros((), dtype=xf.dtype, device=xf.device)
    y = w8a8_linear(torch.where(cols, zero, xf), codes, scale, bias, act_scale, out_features, in_features)
    w = codes.reshape(out_features, in_features).to(torch.float32)
    y = y + torch.matmul(torch.where(cols, xf, zero), w.t()) * scale.float().reshape(1, out_features)
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)


def decomposition_table(output_type: str = "linalg-on-tensors") -> dict[torch._ops.OperatorBase, Callable[..., Tensor]]:
    """``{torch.ops.qbackend.<op>.default: aten implementation}`` for ``ExportedProgram.run_decompositions``.

    ``output_type``: the torch-mlir output type the graph is for (only tosa changes anything).
    """
    import qbackend.kernels.ops  # noqa: F401  (registers torch.ops.qbackend.*)
    import qbackend.smoothquant.ops  # noqa: F401  (registers torch.ops.qbackend.w8a8_outlier_linear)

    work = torch.int32 if output_type == "tosa" else torch.uint8
    ops = torch.ops.qbackend
    return {
        ops.codebook4_linear.default: functools.partial(codebook4_linear, work),
        ops.int4_linear.default: functools.partial(int4_linear, work),
        ops.int8_linear.default: int8_linear,
        ops.w8a8_linear.default: w8a8_linear,
        ops.w8a8_outlier_linear.default: w8a8_outlier_linear,
    }
