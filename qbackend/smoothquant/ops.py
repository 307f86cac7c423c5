"""``qbackend::w8a8_outlier_linear``: W8A8 with LLM.int8()-style outlier columns kept in float.

Columns j of the (flattened) input with any |x[:, j]| >= threshold are outliers: they are computed in
float against the matching (dequantized int8) weight columns; the rest goes through
``qbackend::w8a8_linear`` (int8 x int8, per-token or static activation scale) with those columns
zeroed, so an outlier neither needs nor spoils the int8 activation scale. Device-agnostic: it is
``w8a8_linear`` (CPU kernel / Triton on CUDA) plus a gather and a small float matmul over the few
outlier columns. Backward is straight-through like ``w8a8_linear``: ``grad_x = grad_y @ W``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import ops as _kernel_ops  # noqa: F401  (registers torch.ops.qbackend.w8a8_linear)


def _check(x: Tensor, codes: Tensor, scale: Tensor, threshold: float, n: int, k: int) -> None:
    if x.shape[-1] != k:
        raise ValueError(f"qbackend::w8a8_outlier_linear: x has last dimension {x.shape[-1]}, in_features={k}")
    if codes.dtype != torch.int8 or codes.numel() != n * k:
        raise ValueError(f"qbackend::w8a8_outlier_linear: codes must be int8 with {n * k} elements")
    if scale.dtype != torch.float32 or scale.numel() != n:
        raise ValueError(f"qbackend::w8a8_outlier_linear: scale must be float32 with {n} elements")
    if not threshold > 0:
        raise ValueError(f"qbackend::w8a8_outlier_linear: threshold must be > 0; got {threshold}")


@torch.library.custom_op("qbackend::w8a8_outlier_linear", mutates_args=())
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
    """``w8a8_linear`` with the columns of ``x`` reaching ``threshold`` in float (see module doc)."""
    _check(x, codes, scale, threshold, out_features, in_features)
    w8a8 = torch.ops.qbackend.w8a8_linear
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


@w8a8_outlier_linear.register_fake
def _(x, codes, scale, bias, act_scale, threshold, out_features, in_features):
    _check(x, codes, scale, threshold, out_features, in_features)
    return x.new_empty((*x.shape[:-1], out_features))


def _setup(ctx, inputs, output) -> None:
    x, codes, scale, bias = inputs[:4]
    ctx.save_for_backward(codes, scale)
    ctx.dims = (inputs[6], inputs[7])
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y):
    codes, scale = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.qbackend.int8_linear_grad_input(grad_y, codes, scale, *ctx.dims)
    gb = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.bias_grad else None
    return gx, None, None, gb, None, None, None, None


w8a8_outlier_linear.register_autograd(_backward, setup_context=_setup)
