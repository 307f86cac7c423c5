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

``x`` is [..., K] in fp32/fp16/bf16; the result is [..., N] in x's dtype.

The weight-only ops take ``compute`` (see :data:`qbackend.kernels.spec.COMPUTE_MODES`), which
defines the arithmetic a kernel may use; each mode is defined here as an fp32 computation on
transformed operands (:func:`table_image`, :func:`quantize_activations`), and kernels match it up to summation order:

* ``"fp32"``: exact, ``x @ W^T`` with W decoded in fp32.
* ``"bf16"``: x rounded to bf16; NF4/FP4 code-table values rounded to bf16 (the block constant stays
  fp32); int4/int8 codes are exact in bf16. A kernel may also round the decoded weight itself to
  bf16 (a library bf16 GEMM does): tests allow that, i.e. a relative 2^-8 per product.
* ``"int8"``: each row of x is quantized symmetrically to int8 per block of :data:`ACT_BLOCK` along K
  (scale = amax / 127, ``round(x / scale)`` half to even, clamped to +-127; an all-zero block has
  scale 0); NF4/FP4 table values through their int8 image ``round(c * table) / c`` (:func:`int8_table`);
  int4 and int8 codes are integers already. Rows of x holding NaN/Inf are computed as in ``"fp32"`` (so they give
  NaN/Inf out, as fp32 does, never garbage).
* ``"int16"``: as ``"int8"`` but each row of x is quantized to int16 with one scale per row
  (:data:`INT16_BLOCK` None; scale = amax / 32767, ``round(x / scale)`` half to even, clamped to
  +-32767; an all-zero row has scale 0): on MiniLM 1/100 of int8 weights' own error, against 0.94 for
  "int8". Weights as in ``"int8"`` (int4/int8 codes, the
  NF4/FP4 table's int8 image). A kernel sums the exact integer products of a block in int32 (|x_q w| <=
  32767 * 128, so a block of <= 512 cannot overflow) and applies the scales in fp32. NaN/Inf rows as in
  ``"int8"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: the block of K over which "int8" compute shares one activation scale
ACT_BLOCK = 32
#: the block of K over which "int16" compute shares one activation scale; None: the whole row (chosen by
#: measurement on the real MiniLM: per row adds 0.0095 of int8 weights' own error, per 128-block 0.0062,
#: both far inside the "auto" bound, and one scale per row is the faster kernel; benchmarks/RESULTS.md)
INT16_BLOCK: int | None = None
#: the largest integer of each integer activation mode (symmetric: -qmax..qmax)
ACT_QMAX = {"int8": 127, "int16": 32767}


def quantize_activations(
    x2: torch.Tensor, block: int | None = ACT_BLOCK, qmax: int = 127
) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer values as fp32 [M, K], scales [M, ceil(K/block)]): the "int8" (qmax 127) or "int16"
    (qmax 32767) compute activation rounding; ``block`` None: one scale per row."""
    m, k = x2.shape
    block = k if block is None else max(1, min(block, k))  # past the row's end: the row (the padding is zeros)
    nb = -(-k // block)
    xp = F.pad(x2.float(), (0, nb * block - k)).view(m, nb, block)
    s = xp.abs().amax(dim=2) / float(qmax)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(xp / safe.unsqueeze(2)), -qmax, qmax)
    return q.view(m, nb * block)[:, :k], s


def _dequant_activations(x2: torch.Tensor, block: int | None = ACT_BLOCK, qmax: int = 127) -> torch.Tensor:
    q, s = quantize_activations(x2, block, qmax)
    m, k = x2.shape
    block = k if block is None else max(1, min(block, k))
    nb = s.shape[1]
    return (F.pad(q, (0, nb * block - k)).view(m, nb, block) * s.unsqueeze(2)).view(m, nb * block)[:, :k]


def int8_table(table: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(int8 values ``round(c * table)``, c): the "int8" compute image of a 16-entry code table.

    c is the multiplier in [64, 127] (steps of 0.1) with the smallest squared error of
    ``round(c * t) / c`` against the table: 112 for NF4 (RMS error 1.7e-3 of the block's absmax, vs
    2.2e-3 at c = 127), 120 for FP4. Kernels fold ``1 / c`` into the block scale.
    """
    t = table.detach().double().cpu().reshape(-1)
    cs = torch.arange(640, 1271, dtype=torch.float64) / 10.0
    img = torch.clamp(torch.round(t.unsqueeze(0) * cs.unsqueeze(1)), -127, 127)
    err = ((img / cs.unsqueeze(1) - t.unsqueeze(0)) ** 2).sum(1)
    i = int(torch.argmin(err))  # first minimum: deterministic
    return img[i].to(torch.int8), float(cs[i])


def table_image(table: torch.Tensor, compute: str) -> torch.Tensor:
    """The code-table values a ``compute`` mode multiplies with (fp32)."""
    if compute == "bf16":
        return table.float().bfloat16().float()
    if compute in ("int8", "int16"):
        t8, c = int8_table(table)
        return (t8.double() / c).float().to(table.device)
    return table


def _linear_computed(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, compute: str) -> torch.Tensor:
    """y = x @ w^T + b with x's operand rounding of ``compute`` (w already in its image)."""
    b = None if bias is None else bias.float()
    x2 = x.float().reshape(-1, w.shape[1])
    if compute == "bf16":
        y = F.linear(x2.bfloat16().float(), w, b)
    elif compute in ("int8", "int16"):
        y = F.linear(_dequant_activations(x2, ACT_BLOCK if compute == "int8" else INT16_BLOCK, ACT_QMAX[compute]), w, b)
        bad = ~torch.isfinite(x2).all(dim=1)
        if bool(bad.any()):
            y[bad] = F.linear(x2[bad], w, b)
    else:
        y = F.linear(x2, w, b)
    return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)


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
    compute: str = "fp32",
) -> torch.Tensor:
    """y = x @ W^T + b for an NF4/FP4 weight (see :func:`decode_codebook`)."""
    w = decode_codebook(
        codes, absmax, nested_codes, nested_absmax, nested_offset, table_image(table, compute), nested_table,
        out_features, in_features, blocksize, nested_blocksize,
    )  # fmt: skip
    return _linear_computed(x, w, bias, compute)


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
    compute: str = "fp32",
) -> torch.Tensor:
    """y = x @ W^T + b for an int4 weight, symmetric (zero_point None) or affine, one scale per group."""
    w = decode_int4(codes, scale, zero_point, out_features, in_features, groupsize)
    return _linear_computed(x, w, bias, compute)


def int8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    compute: str = "fp32",
) -> torch.Tensor:
    """y = x @ W^T + b for a symmetric int8 weight with one fp32 scale per output channel."""
    w = codes.view(out_features, in_features).float() * scale.float().view(-1, 1)
    return _linear_computed(x, w, bias, compute)


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
