"""``torch.library`` custom ops for the quantized linears: ``torch.ops.qbackend.*``.

One op per function of :mod:`qbackend.kernels.reference`, with exactly its signature (``x``, the
weight's tensors, ``bias``, then the ints), plus one ``*_grad_input`` op per weight family that
computes ``grad_x = grad_y @ W`` straight from the quantized tensors:

* ``codebook4_linear`` / ``codebook4_linear_grad_input``  (NF4/FP4, plain or nested constants)
* ``int4_linear`` / ``int4_linear_grad_input``            (int4 per group along K, sym or affine)
* ``int8_linear`` / ``int8_linear_grad_input``            (int8 symmetric per output channel)
* ``w8a8_linear``                                          (backward via ``int8_linear_grad_input``)

Weights are frozen: the ops give gradients to ``x`` and ``bias`` only. Autograd saves only the
quantized tensors (never a dequantized float weight); the backward op decodes on the fly.

Each op validates its inputs first and raises ``ValueError``/``TypeError`` naming the bad argument
(never a crash inside a kernel). Implementations: CPU -> :mod:`qbackend.kernels.cpu` (C++ kernels,
with the reference as portable fallback); CUDA -> ``qbackend.kernels.triton`` when importable, else
the reference on the GPU (one-time warning); any other device -> the reference.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import reference as ref

log = logging.getLogger(__name__)

_FLOAT_ACTS = (torch.float32, torch.float16, torch.bfloat16)

# ------------------------------------------------------------------------------------------------
# Validation (runs in the real and the fake implementations, so errors surface at trace time too).
# ------------------------------------------------------------------------------------------------


def _fail(op: str, msg: str, exc: type[Exception] = ValueError) -> None:
    raise exc(f"qbackend::{op}: {msg}")


def _check_act(op: str, name: str, x: Tensor, width: int, width_name: str) -> None:
    if x.dtype not in _FLOAT_ACTS:
        _fail(op, f"{name} must be float32, float16 or bfloat16; got {x.dtype}", TypeError)
    if x.dim() < 1:
        _fail(op, f"{name} must have at least 1 dimension (its last is {width_name}); got a 0-d tensor")
    if x.shape[-1] != width:
        _fail(op, f"{name} has last dimension {x.shape[-1]} but {width_name}={width} (shape {tuple(x.shape)})")


def _check_tensor(
    op: str, name: str, t: Tensor | None, dtypes: tuple[torch.dtype, ...], numel: int | None, device: torch.device
) -> None:
    if t is None:
        return
    if t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        _fail(op, f"{name} must be {want}; got {t.dtype}", TypeError)
    if numel is not None and t.numel() != numel:
        _fail(op, f"{name} has {t.numel()} elements; expected {numel} (shape {tuple(t.shape)})")
    if t.device != device:
        _fail(op, f"{name} is on {t.device} but x is on {device}; move all tensors to one device")


def _check_ints(op: str, **ints: int) -> None:
    for k, v in ints.items():
        if v <= 0:
            _fail(op, f"{k} must be positive; got {v}")


def _check_bias(op: str, bias: Tensor | None, n: int, device: torch.device) -> None:
    if bias is None:
        return
    _check_tensor(op, "bias", bias, _FLOAT_ACTS, n, device)
    if bias.dim() != 1:
        _fail(op, f"bias must be 1-D [out_features={n}]; got shape {tuple(bias.shape)}")


def _check_codebook4(
    op: str,
    x: Tensor,
    x_name: str,
    codes: Tensor,
    absmax: Tensor | None,
    nested_codes: Tensor | None,
    nested_absmax: Tensor | None,
    nested_offset: Tensor | None,
    table: Tensor,
    nested_table: Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    nested_blocksize: int,
    forward: bool,
) -> None:
    _check_ints(op, out_features=n, in_features=k, blocksize=blocksize, nested_blocksize=nested_blocksize)
    _check_act(op, x_name, x, k if forward else n, "in_features" if forward else "out_features")
    dev = x.device
    nblocks = -(-n * k // blocksize)
    _check_tensor(op, "codes", codes, (torch.uint8,), (n * k + 1) // 2, dev)
    _check_tensor(op, "table", table, (torch.float32,), 16, dev)
    nested = [nested_codes, nested_absmax, nested_offset, nested_table]
    if absmax is not None:
        if any(t is not None for t in nested):
            _fail(op, "give either absmax (plain constants) or the nested_* tensors, not both")
        _check_tensor(op, "absmax", absmax, (torch.float32,), nblocks, dev)
    else:
        if any(t is None for t in nested):
            names = ("nested_codes", "nested_absmax", "nested_offset", "nested_table")
            missing = [nm for nm, t in zip(names, nested, strict=True) if t is None]
            _fail(op, f"absmax is None, so nested constants are needed, but {', '.join(missing)} is None")
        _check_tensor(op, "nested_codes", nested_codes, (torch.uint8,), nblocks, dev)
        _check_tensor(op, "nested_absmax", nested_absmax, (torch.float32,), -(-nblocks // nested_blocksize), dev)
        _check_tensor(op, "nested_offset", nested_offset, (torch.float32,), 1, dev)
        _check_tensor(op, "nested_table", nested_table, (torch.float32,), 256, dev)


def _check_int4(
    op: str, x: Tensor, x_name: str, codes: Tensor, scale: Tensor, zero_point: Tensor | None,
    n: int, k: int, groupsize: int, forward: bool,
) -> None:  # fmt: skip
    _check_ints(op, out_features=n, in_features=k, groupsize=groupsize)
    _check_act(op, x_name, x, k if forward else n, "in_features" if forward else "out_features")
    dev = x.device
    groups = -(-k // groupsize)
    _check_tensor(op, "codes", codes, (torch.uint8,), (n * k + 1) // 2, dev)
    _check_tensor(op, "scale", scale, (torch.float32,), n * groups, dev)
    _check_tensor(op, "zero_point", zero_point, (torch.uint8,), n * groups, dev)
    if scale.dim() != 2 or tuple(scale.shape) != (n, groups):
        _fail(op, f"scale must have shape [out_features, ceil(in_features/groupsize)] = [{n}, {groups}]; "
                  f"got {tuple(scale.shape)}")  # fmt: skip
    if zero_point is not None and tuple(zero_point.shape) != (n, groups):
        _fail(op, f"zero_point must have shape [{n}, {groups}] like scale; got {tuple(zero_point.shape)}")


def _check_int8(op: str, x: Tensor, x_name: str, codes: Tensor, scale: Tensor, n: int, k: int, forward: bool) -> None:
    _check_ints(op, out_features=n, in_features=k)
    _check_act(op, x_name, x, k if forward else n, "in_features" if forward else "out_features")
    _check_tensor(op, "codes", codes, (torch.int8,), n * k, x.device)
    _check_tensor(op, "scale", scale, (torch.float32,), n, x.device)


# ------------------------------------------------------------------------------------------------
# Reference implementations of the grad-input ops (grad_x = grad_y @ W, in grad_y's dtype).
# ------------------------------------------------------------------------------------------------


def _ref_grad(grad_y: Tensor, w: Tensor) -> Tensor:
    return (grad_y.float() @ w).to(grad_y.dtype)


def ref_codebook4_linear_grad_input(
    grad_y: Tensor, codes: Tensor, absmax: Tensor | None, nested_codes: Tensor | None,
    nested_absmax: Tensor | None, nested_offset: Tensor | None, table: Tensor, nested_table: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> Tensor:  # fmt: skip
    """Reference ``grad_y @ W`` for a codebook weight (``W`` [N, K] decoded in fp32)."""
    w = ref.decode_codebook4(codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
                             out_features, in_features, blocksize, nested_blocksize)  # fmt: skip
    return _ref_grad(grad_y, w)


def ref_int4_linear_grad_input(
    grad_y: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor | None,
    out_features: int, in_features: int, groupsize: int,
) -> Tensor:  # fmt: skip
    """Reference ``grad_y @ W`` for an int4 weight."""
    return _ref_grad(grad_y, ref.decode_int4(codes, scale, zero_point, out_features, in_features, groupsize))


def ref_int8_linear_grad_input(grad_y: Tensor, codes: Tensor, scale: Tensor, out_features: int, in_features: int):
    """Reference ``grad_y @ W`` for an int8 per-output-channel weight."""
    w = codes.view(out_features, in_features).float() * scale.float().view(-1, 1)
    return _ref_grad(grad_y, w)


# ------------------------------------------------------------------------------------------------
# Device implementations.
# ------------------------------------------------------------------------------------------------

_REF = {
    "codebook4_linear": ref.codebook4_linear,
    "int4_linear": ref.int4_linear,
    "int8_linear": ref.int8_linear,
    "w8a8_linear": ref.w8a8_linear,
    "codebook4_linear_grad_input": ref_codebook4_linear_grad_input,
    "int4_linear_grad_input": ref_int4_linear_grad_input,
    "int8_linear_grad_input": ref_int8_linear_grad_input,
}


def _cpu_impl(name: str) -> Callable[..., Tensor]:
    # The CPU module picks a fast kernel per call and falls back to the reference itself.
    from . import cpu

    return getattr(cpu, name)


@functools.cache
def _cuda_impl(name: str) -> Callable[..., Tensor]:
    """The Triton function ``name`` from ``qbackend.kernels.triton``, or the reference (warned once)."""
    try:
        from . import triton as tk

        return getattr(tk, name)
    except Exception as e:  # noqa: BLE001  (no Triton, no driver, a missing function: all mean "use the reference")
        warnings.warn(
            f"qbackend: no Triton kernel for {name} ({type(e).__name__}: {e}); using the slow reference "
            "implementation on the GPU",
            RuntimeWarning,
            stacklevel=3,
        )
        return _REF[name]


def _dispatch(name: str, x: Tensor, args: Sequence) -> Tensor:
    dev = x.device.type
    if dev == "cpu":
        fn = _cpu_impl(name)
    elif dev == "cuda":
        fn = _cuda_impl(name)
    else:
        fn = _REF[name]
    return fn(x, *args)


def _fresh(out: Tensor, *inputs: Tensor | None) -> Tensor:
    # custom_op outputs must not alias inputs (the reference can return x itself for a no-op cast).
    if any(t is not None and out.data_ptr() == t.data_ptr() and out.numel() for t in inputs):
        return out.clone()
    return out


# ------------------------------------------------------------------------------------------------
# Ops.
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("qbackend::codebook4_linear", mutates_args=())
def codebook4_linear(
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
    """``y = x @ W^T + b`` for an NF4/FP4 weight (see :func:`qbackend.kernels.reference.codebook4_linear`).

    Gradients flow to ``x`` and ``bias`` only; the quantized weight is frozen.
    """
    _check_codebook4("codebook4_linear", x, "x", codes, absmax, nested_codes, nested_absmax, nested_offset, table,
                     nested_table, out_features, in_features, blocksize, nested_blocksize, True)  # fmt: skip
    _check_bias("codebook4_linear", bias, out_features, x.device)
    args = (codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table, bias,
            out_features, in_features, blocksize, nested_blocksize)  # fmt: skip
    return _fresh(_dispatch("codebook4_linear", x, args), x)


@torch.library.custom_op("qbackend::codebook4_linear_grad_input", mutates_args=())
def codebook4_linear_grad_input(
    grad_y: Tensor,
    codes: Tensor,
    absmax: Tensor | None,
    nested_codes: Tensor | None,
    nested_absmax: Tensor | None,
    nested_offset: Tensor | None,
    table: Tensor,
    nested_table: Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    nested_blocksize: int,
) -> Tensor:
    """``grad_x = grad_y @ W`` ([..., N] -> [..., K], grad_y's dtype) for an NF4/FP4 weight."""
    _check_codebook4("codebook4_linear_grad_input", grad_y, "grad_y", codes, absmax, nested_codes, nested_absmax,
                     nested_offset, table, nested_table, out_features, in_features, blocksize, nested_blocksize,
                     False)  # fmt: skip
    args = (codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
            out_features, in_features, blocksize, nested_blocksize)  # fmt: skip
    return _fresh(_dispatch("codebook4_linear_grad_input", grad_y, args), grad_y)


@torch.library.custom_op("qbackend::int4_linear", mutates_args=())
def int4_linear(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    groupsize: int,
) -> Tensor:
    """``y = x @ W^T + b`` for an int4 weight (see :func:`qbackend.kernels.reference.int4_linear`).

    Gradients flow to ``x`` and ``bias`` only; the quantized weight is frozen.
    """
    _check_int4("int4_linear", x, "x", codes, scale, zero_point, out_features, in_features, groupsize, True)
    _check_bias("int4_linear", bias, out_features, x.device)
    args = (codes, scale, zero_point, bias, out_features, in_features, groupsize)
    return _fresh(_dispatch("int4_linear", x, args), x)


@torch.library.custom_op("qbackend::int4_linear_grad_input", mutates_args=())
def int4_linear_grad_input(
    grad_y: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    out_features: int,
    in_features: int,
    groupsize: int,
) -> Tensor:
    """``grad_x = grad_y @ W`` ([..., N] -> [..., K], grad_y's dtype) for an int4 weight."""
    _check_int4("int4_linear_grad_input", grad_y, "grad_y", codes, scale, zero_point, out_features, in_features,
                groupsize, False)  # fmt: skip
    args = (codes, scale, zero_point, out_features, in_features, groupsize)
    return _fresh(_dispatch("int4_linear_grad_input", grad_y, args), grad_y)


@torch.library.custom_op("qbackend::int8_linear", mutates_args=())
def int8_linear(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
) -> Tensor:
    """``y = x @ W^T + b`` for a symmetric int8 weight, one fp32 scale per output channel.

    Gradients flow to ``x`` and ``bias`` only; the quantized weight is frozen.
    """
    _check_int8("int8_linear", x, "x", codes, scale, out_features, in_features, True)
    _check_bias("int8_linear", bias, out_features, x.device)
    return _fresh(_dispatch("int8_linear", x, (codes, scale, bias, out_features, in_features)), x)


@torch.library.custom_op("qbackend::int8_linear_grad_input", mutates_args=())
def int8_linear_grad_input(
    grad_y: Tensor,
    codes: Tensor,
    scale: Tensor,
    out_features: int,
    in_features: int,
) -> Tensor:
    """``grad_x = grad_y @ W`` ([..., N] -> [..., K], grad_y's dtype) for an int8 per-channel weight."""
    _check_int8("int8_linear_grad_input", grad_y, "grad_y", codes, scale, out_features, in_features, False)
    return _fresh(_dispatch("int8_linear_grad_input", grad_y, (codes, scale, out_features, in_features)), grad_y)


@torch.library.custom_op("qbackend::w8a8_linear", mutates_args=())
def w8a8_linear(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    act_scale: Tensor | None,
    out_features: int,
    in_features: int,
) -> Tensor:
    """int8 x int8 -> int32 linear with per-token (or static ``act_scale``) activation quantization.

    See :func:`qbackend.kernels.reference.w8a8_linear`. Backward treats the activation rounding as
    the identity (straight-through): ``grad_x = grad_y @ W``. Weight and ``act_scale`` are frozen.
    """
    _check_int8("w8a8_linear", x, "x", codes, scale, out_features, in_features, True)
    _check_bias("w8a8_linear", bias, out_features, x.device)
    _check_tensor("w8a8_linear", "act_scale", act_scale, (torch.float32,), 1, x.device)
    return _fresh(_dispatch("w8a8_linear", x, (codes, scale, bias, act_scale, out_features, in_features)), x)


# ------------------------------------------------------------------------------------------------
# Fake (meta) implementations: validation + output shape [..., N] (or [..., K] for grad ops).
# ------------------------------------------------------------------------------------------------


@codebook4_linear.register_fake
def _(x, codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table, bias,
      out_features, in_features, blocksize, nested_blocksize):  # fmt: skip
    _check_codebook4("codebook4_linear", x, "x", codes, absmax, nested_codes, nested_absmax, nested_offset, table,
                     nested_table, out_features, in_features, blocksize, nested_blocksize, True)  # fmt: skip
    _check_bias("codebook4_linear", bias, out_features, x.device)
    return x.new_empty((*x.shape[:-1], out_features))


@codebook4_linear_grad_input.register_fake
def _(grad_y, codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
      out_features, in_features, blocksize, nested_blocksize):  # fmt: skip
    _check_codebook4("codebook4_linear_grad_input", grad_y, "grad_y", codes, absmax, nested_codes, nested_absmax,
                     nested_offset, table, nested_table, out_features, in_features, blocksize, nested_blocksize,
                     False)  # fmt: skip
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


@int4_linear.register_fake
def _(x, codes, scale, zero_point, bias, out_features, in_features, groupsize):
    _check_int4("int4_linear", x, "x", codes, scale, zero_point, out_features, in_features, groupsize, True)
    _check_bias("int4_linear", bias, out_features, x.device)
    return x.new_empty((*x.shape[:-1], out_features))


@int4_linear_grad_input.register_fake
def _(grad_y, codes, scale, zero_point, out_features, in_features, groupsize):
    _check_int4("int4_linear_grad_input", grad_y, "grad_y", codes, scale, zero_point, out_features, in_features,
                groupsize, False)  # fmt: skip
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


@int8_linear.register_fake
def _(x, codes, scale, bias, out_features, in_features):
    _check_int8("int8_linear", x, "x", codes, scale, out_features, in_features, True)
    _check_bias("int8_linear", bias, out_features, x.device)
    return x.new_empty((*x.shape[:-1], out_features))


@int8_linear_grad_input.register_fake
def _(grad_y, codes, scale, out_features, in_features):
    _check_int8("int8_linear_grad_input", grad_y, "grad_y", codes, scale, out_features, in_features, False)
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


@w8a8_linear.register_fake
def _(x, codes, scale, bias, act_scale, out_features, in_features):
    _check_int8("w8a8_linear", x, "x", codes, scale, out_features, in_features, True)
    _check_bias("w8a8_linear", bias, out_features, x.device)
    _check_tensor("w8a8_linear", "act_scale", act_scale, (torch.float32,), 1, x.device)
    return x.new_empty((*x.shape[:-1], out_features))


# ------------------------------------------------------------------------------------------------
# Autograd: grad to x (through the grad-input op; only quantized tensors are saved) and bias.
# ------------------------------------------------------------------------------------------------


def _grad_bias(ctx, grad_y: Tensor) -> Tensor | None:
    if not ctx.bias_needs_grad:
        return None
    return grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)


def _setup(ctx, weight: tuple, ints: tuple, bias: Tensor | None, x: Tensor) -> None:
    ctx.save_for_backward(*weight)
    ctx.ints = ints
    ctx.x_needs_grad = x.requires_grad
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.x_dtype = x.dtype


def _gx(ctx, g: Tensor | None) -> Tensor | None:
    return None if g is None else g.to(ctx.x_dtype)


def _cb4_setup(ctx, inputs, output):
    x, *w, bias = inputs[:9]
    _setup(ctx, tuple(w), tuple(inputs[9:]), bias, x)


def _cb4_backward(ctx, grad_y):
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.qbackend.codebook4_linear_grad_input(grad_y, *ctx.saved_tensors, *ctx.ints)
    return (_gx(ctx, gx), *([None] * 7), _grad_bias(ctx, grad_y), None, None, None, None)


def _int4_setup(ctx, inputs, output):
    x, codes, scale, zp, bias = inputs[:5]
    _setup(ctx, (codes, scale, zp), tuple(inputs[5:]), bias, x)


def _int4_backward(ctx, grad_y):
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.qbackend.int4_linear_grad_input(grad_y, *ctx.saved_tensors, *ctx.ints)
    return _gx(ctx, gx), None, None, None, _grad_bias(ctx, grad_y), None, None, None


def _int8_setup(ctx, inputs, output):
    x, codes, scale, bias = inputs[:4]
    _setup(ctx, (codes, scale), tuple(inputs[4:]), bias, x)


def _int8_backward(ctx, grad_y):
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.qbackend.int8_linear_grad_input(grad_y, *ctx.saved_tensors, *ctx.ints)
    return _gx(ctx, gx), None, None, _grad_bias(ctx, grad_y), None, None


def _w8a8_setup(ctx, inputs, output):
    x, codes, scale, bias, _act_scale = inputs[:5]
    _setup(ctx, (codes, scale), tuple(inputs[5:]), bias, x)


def _w8a8_backward(ctx, grad_y):
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.qbackend.int8_linear_grad_input(grad_y, *ctx.saved_tensors, *ctx.ints)
    return _gx(ctx, gx), None, None, _grad_bias(ctx, grad_y), None, None, None


codebook4_linear.register_autograd(_cb4_backward, setup_context=_cb4_setup)
int4_linear.register_autograd(_int4_backward, setup_context=_int4_setup)
int8_linear.register_autograd(_int8_backward, setup_context=_int8_setup)
w8a8_linear.register_autograd(_w8a8_backward, setup_context=_w8a8_setup)

#: forward op name -> its grad-input op (for tests and reports)
GRAD_INPUT_OPS = {
    "codebook4_linear": "codebook4_linear_grad_input",
    "int4_linear": "int4_linear_grad_input",
    "int8_linear": "int8_linear_grad_input",
    "w8a8_linear": "int8_linear_grad_input",
}
