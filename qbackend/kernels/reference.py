"""Reference (slow, obviously-correct) quantized linear functions: THE contract for every kernel.

Every fast path (CPU ops, Triton kernels) has exactly these signatures and must match these
results (up to float summation order). Functions are named by kernel stem (see
:class:`qbackend.kernels.spec.OpFamily`): ``codebook`` serves nf4 and fp4 (the 16-entry code table
is an argument), ``int4``, ``int8``, ``w8a8``, ``w8a8_outlier``; ``<stem>_linear_grad_input``
computes ``grad_x = grad_y @ W`` in grad_y's dtype. Weights are in the canonical storage layout of
:class:`qbackend.formats.QuantizedWeight` (bitsandbytes' flat layout for 4-bit codes):

* ``codes`` of a 4-bit weight: uint8, ``(N*K + 1) // 2`` bytes over the row-major flattened
  [N, K] weight, element ``i`` in the high nibble of byte ``i // 2`` when ``i`` is even.
* codebook (NF4/FP4) blocks run over the flattened weight: element (n, k) is in block
  ``(n*K + k) // blocksize`` (blocks may straddle rows when K % blocksize != 0).
* int4 groups run along K within a row: element (n, k) uses scale[n, k // groupsize].

``x`` is [..., K] in fp32/fp16/bf16; the result is [..., N] in x's dtype, computed in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _unpack(codes: torch.Tensor, numel: int) -> torch.Tensor:
    flat = codes.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1)[:numel]


def decode_codebook(
    codes: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    table: torch.Tensor,
    nested_table: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    nested_blocksize: int,
) -> torch.Tensor:
    """fp32 [N, K] weight of an NF4/FP4 code tensor with plain or nested block constants."""
    n = out_features * in_features
    if nested_codes is not None:
        assert nested_absmax is not None and nested_offset is not None and nested_table is not None
        i = torch.arange(nested_codes.numel(), device=codes.device)
        absmax = nested_table[nested_codes.long()] * nested_absmax[i // nested_blocksize] + nested_offset.reshape(())
    assert absmax is not None
    e = torch.arange(n, device=codes.device)
    w = table[_unpack(codes, n).long()] * absmax[e // blocksize]
    return w.view(out_features, in_features)


def codebook_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    table: torch.Tensor,
    nested_table: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    nested_blocksize: int,
) -> torch.Tensor:
    """y = x @ W^T + b for an NF4/FP4 weight (see :func:`decode_codebook`)."""
    w = decode_codebook(
        codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
        out_features, in_features, blocksize, nested_blocksize,
    )  # fmt: skip
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w, b).to(x.dtype)


def decode_int4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    out_features: int,
    in_features: int,
    groupsize: int,
) -> torch.Tensor:
    """fp32 [N, K] weight of int4 codes (unsigned nibbles; zero point 8 when ``zero_point`` is None)."""
    q = _unpack(codes, out_features * in_features).view(out_features, in_features).float()
    g = torch.arange(in_features, device=codes.device) // groupsize
    zp = 8.0 if zero_point is None else zero_point.float()[:, g]
    return (q - zp) * scale.float()[:, g]


def int4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    groupsize: int,
) -> torch.Tensor:
    """y = x @ W^T + b for an int4 weight, symmetric (zero_point None) or affine, one scale per group."""
    w = decode_int4(codes, scale, zero_point, out_features, in_features, groupsize)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w, b).to(x.dtype)


def int8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """y = x @ W^T + b for a symmetric int8 weight with one fp32 scale per output channel."""
    w = codes.view(out_features, in_features).float() * scale.float().view(-1, 1)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w, b).to(x.dtype)


def w8a8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """int8 activations x int8 weights -> int32, rescaled: the W8A8 (SmoothQuant) linear.

    Activations are quantized symmetrically to int8 per token (row of the flattened [M, K] input)
    when ``act_scale`` is None, else with that static per-tensor scale.
    """
    xf = x.float().reshape(-1, in_features)
    if act_scale is None:
        s_x = xf.abs().amax(dim=1, keepdim=True) / 127.0
    else:
        s_x = act_scale.float().reshape(1, 1).expand(xf.shape[0], 1)
    safe = torch.where(s_x > 0, s_x, torch.ones_like(s_x))
    xq = torch.clamp(torch.round(xf / safe), -127, 127)
    # int8 x int8 products summed in float64 are exact integers, like the int32 accumulator.
    acc = (xq.double() @ codes.view(out_features, in_features).double().t()).float()
    y = acc * s_x * scale.float().view(1, -1)
    # acc * s_x alone overflows fp32 for |x| ~ 1e36 where x @ W^T does not: there, the weight scale first.
    y = torch.where(torch.isfinite(y), y, acc * scale.float().view(1, -1) * s_x)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)


def w8a8_outlier_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    threshold: float,
    out_features: int,
    in_features: int,
    *,
    w8a8: Callable[..., torch.Tensor] = w8a8_linear,
) -> torch.Tensor:
    """W8A8 with LLM.int8()-style outlier columns kept in float.

    Columns j of the flattened input with any |x[:, j]| >= threshold are computed in float against
    the matching (dequantized int8) weight columns; the rest goes through ``w8a8`` (default: the
    reference :func:`w8a8_linear`; the op passes ``torch.ops.qbackend.w8a8_linear``, so the device's
    W8A8 kernel runs) with those columns zeroed, so an outlier neither needs nor spoils the int8
    activation scale.
    """
    xf = x.reshape(-1, in_features)
    if xf.shape[0] == 0:
        return w8a8(x, codes, scale, bias, act_scale, out_features, in_features)
    lo, hi = torch.aminmax(xf, dim=0)  # one pass over x, no |x| temporary
    idx = ((hi >= threshold) | (lo <= -threshold)).nonzero().squeeze(1)
    if idx.numel() == 0:
        return w8a8(x, codes, scale, bias, act_scale, out_features, in_features)
    regular = xf.index_fill(1, idx, 0.0)
    y = w8a8(regular, codes, scale, bias, act_scale, out_features, in_features).float()
    w_out = codes.view(out_features, in_features).index_select(1, idx).float() * scale.view(-1, 1)
    y = torch.addmm(y, xf.index_select(1, idx).float(), w_out.t())
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


# ---- grad_x = grad_y @ W (in grad_y's dtype, W decoded in fp32) --------------------------------


def _grad(grad_y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (grad_y.float() @ w).to(grad_y.dtype)


def codebook_linear_grad_input(
    grad_y: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    table: torch.Tensor,
    nested_table: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    nested_blocksize: int,
) -> torch.Tensor:
    """``grad_y @ W`` for an NF4/FP4 weight."""
    w = decode_codebook(codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
                        out_features, in_features, blocksize, nested_blocksize)  # fmt: skip
    return _grad(grad_y, w)


def int4_linear_grad_input(
    grad_y: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    out_features: int,
    in_features: int,
    groupsize: int,
) -> torch.Tensor:
    """``grad_y @ W`` for an int4 weight."""
    return _grad(grad_y, decode_int4(codes, scale, zero_point, out_features, in_features, groupsize))


def int8_linear_grad_input(
    grad_y: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int
) -> torch.Tensor:
    """``grad_y @ W`` for an int8 per-output-channel weight."""
    return _grad(grad_y, codes.view(out_features, in_features).float() * scale.float().view(-1, 1))
