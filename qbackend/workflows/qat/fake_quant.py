"""Differentiable fake quantization with the exact numerics of the deployed formats.

Weights: ``fake_quantize_weight(w, scheme, ratio)`` returns ``quantize(clip(w), scheme).dequantize()``
bit for bit (NF4/FP4 blocks with plain or nested constants, int4/int8 per tensor/channel/group,
symmetric or affine), where ``clip`` limits every unit (block/group/channel) to ``ratio`` times its
own range (no-op without ratios). The deployed weight is that same clipped weight quantized by the
ordinary format code, so QAT forward and deployment agree exactly.

Gradients (straight-through estimator): ``dL/dw = dL/dout`` where ``w`` is inside its unit's
(clipped) range, 0 outside. Learnable ratios get the LSQ gradient
``dL/dr = sum_unit dL/dout * (out - w * inside) / r`` (rounding treated as identity; nesting too;
straight through the cap: a ratio above 1 acts as 1 but still gets this gradient).

Activations: ``fake_quantize_activation(x, scale)``: symmetric int8, one scale per token
(``scale=None``: ``absmax(row) / 127``) or a static per-tensor scale, exactly as the
``w8a8_linear`` reference quantizes its input; STE with gradient 0 where the static range clips.

All numerics run inside ``torch.library`` custom ops: opaque to Inductor, so compiled QAT graphs
compute the same bits as eager code (no reordered reductions), and they are safe for the compile caches.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from dataclasses import asdict

import torch
from torch import Tensor

from ...formats import QuantizedWeight, Scheme, code_table, quantize
from .units import expand_units, from_units, to_units, unit_range

__all__ = [
    "clip_weight",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "observe_absmax",
    "scheme_key",
]

ACT_QMAX = 127.0


def scheme_key(scheme: Scheme) -> str:
    """A Scheme as the string argument the custom ops take."""
    return json.dumps(asdict(scheme), sort_keys=True)


@functools.cache
def _scheme(key: str) -> Scheme:
    return Scheme(**json.loads(key))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run memory-bound elementwise passes on one intra-op thread.

    Measured on the shared 2-core machines: a 590k-element decode takes 0.8 ms on one thread and
    ~85 ms on two (every OpenMP join waits for a descheduled thread); one thread saturates memory anyway.
    """
    prev = torch.get_num_threads()
    if prev > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if prev > 1:
            torch.set_num_threads(prev)


# ---- weights: exact forward ----------------------------------------------------------------------


def _clip_bounds(wf: Tensor, scheme: Scheme, ratio: Tensor, min_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-unit (lo, hi) of the clipped range in fp32, and the effective ratio (capped to [min_ratio, 1]).

    Callers round the bounds to the weight's dtype, so the clipped weight is representable in it
    (deploying the clipped weight in its own dtype then reproduces these numerics).
    """
    lo, hi = unit_range(wf, scheme)
    r = ratio.detach().float().reshape(-1).clamp(min_ratio, 1.0)
    return lo * r, hi * r, r


def clip_weight(w: Tensor, scheme: Scheme, ratio: Tensor | None, min_ratio: float = 0.05) -> Tensor:
    """``w`` with every unit clipped to ``ratio`` (capped to [min_ratio, 1]) times its range, in w's dtype.

    Without ``ratio`` returns ``w`` itself. This is the weight `convert` deploys.
    """
    if ratio is None:
        return w
    wf = w.detach().float()
    lo, hi, _ = _clip_bounds(wf, scheme, ratio, min_ratio)
    unit_len = to_units(wf, scheme).shape[1]
    lo_e = expand_units(lo.to(w.dtype).float(), tuple(w.shape), scheme, unit_len)
    hi_e = expand_units(hi.to(w.dtype).float(), tuple(w.shape), scheme, unit_len)
    return torch.minimum(torch.maximum(wf, lo_e), hi_e).to(w.dtype)


def _fq_weight_value(w: Tensor, scheme: Scheme, ratio: Tensor | None, min_ratio: float) -> Tensor:
    """The exact fake-quantized value: the format's own quantize, then dequantize, of the clipped weight."""
    wc = clip_weight(w.detach(), scheme, ratio, min_ratio)
    return dequantize_fast(quantize(wc, scheme, name="qat weight"), w.dtype)


@functools.cache
def _pair_table(kind: str, signed_int: bool) -> Tensor:
    """[256, 2] fp32: the two values a packed byte stands for (first element in the high nibble)."""
    if kind == "int":
        t = torch.arange(16, dtype=torch.float32) - (8.0 if signed_int else 0.0)
    else:
        t = code_table(kind).clone()
    b = torch.arange(256)
    return torch.stack([t[b >> 4], t[b & 15]], dim=1).contiguous()


def dequantize_fast(qw: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    """``qw.dequantize(dtype)``, bit for bit, decoding two 4-bit codes per table lookup.

    Same fp32 values and the same single multiply per element as the formats' decoder (the test
    suite checks equality), without its shift/mask/stack unpacking, which dominates QAT steps.
    """
    s, numel, shape = qw.scheme, qw.numel, qw.shape
    consts = qw.block_constants().float()
    if s.bits == 4:
        table = _pair_table(s.kind, s.kind == "int" and s.symmetric).to(qw.codes.device)
        values = table.index_select(0, qw.codes.reshape(-1).long()).view(-1)[:numel]
    else:
        values = qw.codes.reshape(-1).float()
    if s.kind in ("nf4", "fp4"):
        nblocks = consts.numel()
        pad = nblocks * s.blocksize - numel
        if pad:
            values = torch.cat([values, values.new_zeros(pad)])
        return (values.view(nblocks, s.blocksize) * consts.view(-1, 1)).view(-1)[:numel].view(shape).to(dtype)
    x = values.view(shape)
    unit_len = to_units(x, s).shape[1]
    if qw.zero_point is not None:
        x = x - expand_units(qw.zero_point.float().reshape(-1), shape, s, unit_len)
    return (x * expand_units(consts.reshape(-1), shape, s, unit_len)).to(dtype)


@torch.library.custom_op("qbackend::qat_fake_quant_weight", mutates_args=())
def _fq_weight_op(w: Tensor, ratio: Tensor | None, scheme: str, min_ratio: float) -> Tensor:
    with _one_thread():
        return _fq_weight_value(w, _scheme(scheme), ratio, min_ratio)


@_fq_weight_op.register_fake
def _(w: Tensor, ratio: Tensor | None, scheme: str, min_ratio: float) -> Tensor:
    return torch.empty_like(w)


# ---- weights: backward ---------------------------------------------------------------------------


@torch.library.custom_op("qbackend::qat_fake_quant_weight_backward", mutates_args=())
def _fq_weight_bwd_op(
    grad: Tensor, w: Tensor, out: Tensor, ratio: Tensor, scheme: str, min_ratio: float
) -> tuple[Tensor, Tensor]:
    """(grad_w, grad_ratio) of the clipped fake quantization (STE + LSQ)."""
    with _one_thread():
        return _fq_weight_grads(grad, w, out, ratio, _scheme(scheme), min_ratio)


def _fq_weight_grads(
    grad: Tensor, w: Tensor, out: Tensor, ratio: Tensor, s: Scheme, min_ratio: float
) -> tuple[Tensor, Tensor]:
    wf, g = w.float(), grad.float()
    lo, hi, r = _clip_bounds(wf, s, ratio, min_ratio)
    gu, wu, ou = to_units(g, s), to_units(wf, s), to_units(out.float(), s)
    lo_u = lo.to(w.dtype).float()[:, None]
    hi_u = hi.to(w.dtype).float()[:, None]
    inside = (wu >= lo_u) & (wu <= hi_u)
    grad_w_u = torch.where(inside, gu, torch.zeros_like(gu))
    # LSQ: d out / d r = (out - w * inside) / r for every element of the unit (padding contributes 0).
    # Straight through the [min_ratio, 1] cap: linear in the upstream gradient, so accumulating
    # micro-batch gradients equals the full batch's. A ratio pushed above 1 acts as 1.
    grad_r = (gu * (ou - torch.where(inside, wu, torch.zeros_like(wu)))).sum(dim=1) / r
    grad_w = from_units(grad_w_u, tuple(w.shape), s).to(w.dtype).contiguous()
    return grad_w, grad_r.reshape(ratio.shape).to(ratio.dtype)


@_fq_weight_bwd_op.register_fake
def _(grad: Tensor, w: Tensor, out: Tensor, ratio: Tensor, scheme: str, min_ratio: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(w), torch.empty_like(ratio)


def _fq_weight_setup(ctx, inputs, output) -> None:
    w, ratio, scheme, min_ratio = inputs
    ctx.scheme, ctx.min_ratio = scheme, min_ratio
    ctx.has_ratio = ratio is not None
    if ctx.has_ratio:
        # Only the LSQ gradient needs tensors: the weight (a parameter anyway) and the output.
        ctx.save_for_backward(w, output, ratio)


def _fq_weight_backward(ctx, grad: Tensor):
    if not ctx.has_ratio:
        # Scales follow the weight's own range, so nothing is clipped: the STE is the identity.
        return grad, None, None, None
    w, out, ratio = ctx.saved_tensors
    gw, gr = torch.ops.qbackend.qat_fake_quant_weight_backward(grad, w, out, ratio, ctx.scheme, ctx.min_ratio)
    return gw, gr, None, None


_fq_weight_op.register_autograd(_fq_weight_backward, setup_context=_fq_weight_setup)


def fake_quantize_weight(w: Tensor, scheme: Scheme, ratio: Tensor | None = None, min_ratio: float = 0.05) -> Tensor:
    """Fake-quantize weight ``w`` to ``scheme`` (differentiable; see the module docstring).

    ``ratio``: optional learnable clipping ratios, one per unit (``units.num_units``), 1.0 = no clip.
    """
    return torch.ops.qbackend.qat_fake_quant_weight(w, ratio, scheme_key(scheme), float(min_ratio))


# ---- activations ---------------------------------------------------------------------------------


def _act_scale(xf: Tensor, scale: Tensor | None) -> Tensor:
    """[M, 1] fp32 scales of the flattened [M, K] input (as ``reference.w8a8_linear``)."""
    if scale is None:
        return xf.abs().amax(dim=1, keepdim=True) / ACT_QMAX
    return scale.float().reshape(1, 1).expand(xf.shape[0], 1)


@torch.library.custom_op("qbackend::qat_fake_quant_act", mutates_args=())
def _fq_act_op(x: Tensor, scale: Tensor | None) -> Tensor:
    with _one_thread():
        xf = x.float().reshape(-1, x.shape[-1])
        s = _act_scale(xf, scale)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(xf / safe), -ACT_QMAX, ACT_QMAX)
        return (q * s).reshape(x.shape).to(x.dtype)


@_fq_act_op.register_fake
def _(x: Tensor, scale: Tensor | None) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qbackend::qat_fake_quant_act_backward", mutates_args=())
def _fq_act_bwd_op(grad: Tensor, x: Tensor, scale: Tensor) -> Tensor:
    s = scale.float().reshape(())
    safe = torch.where(s > 0, s, torch.ones_like(s))
    inside = (x.float() / safe).abs() <= ACT_QMAX
    return torch.where(inside, grad, torch.zeros_like(grad))


@_fq_act_bwd_op.register_fake
def _(grad: Tensor, x: Tensor, scale: Tensor) -> Tensor:
    return torch.empty_like(grad)


def _fq_act_setup(ctx, inputs, output) -> None:
    x, scale = inputs
    ctx.static = scale is not None
    if ctx.static:
        ctx.save_for_backward(x, scale)


def _fq_act_backward(ctx, grad: Tensor):
    if not ctx.static:
        return grad, None  # per-token absmax scales never clip
    x, scale = ctx.saved_tensors
    return torch.ops.qbackend.qat_fake_quant_act_backward(grad, x, scale), None


_fq_act_op.register_autograd(_fq_act_backward, setup_context=_fq_act_setup)


def fake_quantize_activation(x: Tensor, scale: Tensor | None = None) -> Tensor:
    """Symmetric int8 fake quantization of ``x`` [..., K]: per token (``scale=None``) or with a static
    per-tensor ``scale`` (0-d or 1-element, fp32). Differentiable (STE)."""
    return torch.ops.qbackend.qat_fake_quant_act(x, scale)


# ---- static-activation observer ------------------------------------------------------------------


@torch.library.custom_op("qbackend::qat_observe_absmax", mutates_args=("running", "observed"))
def _observe_op(x: Tensor, running: Tensor, observed: Tensor, observing: Tensor, momentum: float) -> Tensor:
    """Update the moving-average absmax (when ``observing``) and return the int8 scale ``running / 127``.

    The first observed batch initialises the average; later ones blend in with weight ``momentum``.
    """
    cur = x.detach().abs().amax().float().reshape(running.shape)
    on = observing.reshape(()).bool()
    first = ~observed.reshape(()).bool()
    blended = torch.where(first, cur, running * (1.0 - momentum) + cur * momentum)
    running.copy_(torch.where(on, blended, running))
    observed.copy_(observed | on)
    return running / ACT_QMAX


@_observe_op.register_fake
def _(x: Tensor, running: Tensor, observed: Tensor, observing: Tensor, momentum: float) -> Tensor:
    return torch.empty_like(running)


def observe_absmax(x: Tensor, running: Tensor, observed: Tensor, observing: Tensor, momentum: float) -> Tensor:
    """Observer step (mutates ``running``/``observed`` in place); returns the static scale to use now."""
    return torch.ops.qbackend.qat_observe_absmax(x.detach(), running, observed, observing, float(momentum))
