"""Fake-quantization numerics: bit-identical to the formats, straight-through gradients, LSQ, activations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qbackend.formats import Scheme, quantize
from qbackend.kernels import reference as ref
from qbackend.workflows.qat.config import QATConfig
from qbackend.workflows.qat.deploy import deployed_weight
from qbackend.workflows.qat.fake_quant import (
    clip_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    observe_absmax,
)
from qbackend.workflows.qat.state import LinearQAT
from qbackend.workflows.qat.units import num_units, to_units, unit_range

SCHEMES = [
    Scheme("nf4", blocksize=64, nested=True),
    Scheme("nf4", blocksize=32),
    Scheme("fp4", blocksize=128, nested=True),
    Scheme("fp4", blocksize=64),
    Scheme("int", 4, symmetric=True, granularity="block", blocksize=32),
    Scheme("int", 4, symmetric=False, granularity="block", blocksize=64),
    Scheme("int", 4, symmetric=True, granularity="block", blocksize=16, nested=True, nested_blocksize=32),
    Scheme("int", 8, symmetric=True, granularity="channel", axis=0),
    Scheme("int", 8, symmetric=True, granularity="channel", axis=1),
    Scheme("int", 8, symmetric=False, granularity="tensor"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def weights(draw: st.DrawFn) -> tuple[torch.Tensor, Scheme]:
    """A weight of random shape (not multiples of the block size too), dtype and scale, with a scheme."""
    scheme = draw(st.sampled_from(SCHEMES))
    shape = (draw(st.integers(1, 70)), draw(st.integers(1, 150)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    if draw(st.booleans()):  # outliers and exact zeros: the edge cases of absmax scaling
        w.view(-1)[:: max(1, w.numel() // 3)] *= 20.0
        w.view(-1)[1::7] = 0.0
    return w.to(dtype), scheme


@given(weights())
def test_fake_quant_is_bit_identical_to_quantize_dequantize(case):
    w, scheme = case
    out = fake_quantize_weight(w, scheme)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(out, quantize(w, scheme).dequantize())


@given(weights(), st.integers(0, 2**16))
def test_learned_ratios_deploy_exactly(case, seed):
    """With clipping ratios, the QAT forward equals the deployed (clipped, ordinary-format) weight."""
    w, scheme = case
    g = torch.Generator().manual_seed(seed)
    r = 0.3 + 0.9 * torch.rand(num_units(tuple(w.shape), scheme), generator=g)  # some above the 1.0 cap
    state = LinearQAT(scheme, QATConfig(learnable_scales=True), tuple(w.shape))
    with torch.no_grad():
        state.weight_ratio.copy_(r)
    out = fake_quantize_weight(w, scheme, state.weight_ratio)
    qw = deployed_weight(w, scheme, state)
    assert torch.equal(out, qw.dequantize())
    # The clip is exact: each unit's range becomes ratio x range (in the weight's dtype).
    wc = clip_weight(w, scheme, r).float()
    lo, hi = unit_range(w.float(), scheme)
    r_eff = r.clamp(0.05, 1.0)
    assert torch.equal(unit_range(wc, scheme)[1], (hi * r_eff).to(w.dtype).float())
    assert torch.equal(unit_range(wc, scheme)[0], (lo * r_eff).to(w.dtype).float())


@pytest.mark.parametrize("scheme", SCHEMES[:1] + SCHEMES[4:6] + SCHEMES[7:8], ids=lambda s: s.name)
def test_ste_gradients(scheme):
    torch.manual_seed(0)
    w = torch.randn(24, 80, requires_grad=True)
    g = torch.randn(24, 80)
    fake_quantize_weight(w, scheme).backward(g)
    assert torch.equal(w.grad, g)  # absmax scales clip nothing: identity

    # With ratios: zero gradient exactly where the weight was clipped, identity elsewhere.
    r = torch.full((num_units((24, 80), scheme),), 0.6, requires_grad=True)
    w.grad = None
    fake_quantize_weight(w, scheme, r).backward(g)
    wc = clip_weight(w.detach(), scheme, r.detach())
    clipped = wc != w.detach()
    assert clipped.any()
    assert torch.equal(w.grad, torch.where(clipped, torch.zeros_like(g), g))


@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[1], SCHEMES[4], SCHEMES[5]], ids=lambda s: s.name)
def test_lsq_ratio_gradient_matches_surrogate(scheme):
    """d out / d ratio equals autograd through a differentiable LSQ surrogate of the same function.

    Surrogate: s = r * range; w' = clamp(w, lo*r, hi*r); out = w' + (fq - w').detach() rescaled with s,
    i.e. rounding (and nesting) treated as identity — the LSQ estimator.
    """
    torch.manual_seed(1)
    shape = (16, 96)
    w = torch.randn(shape)
    r0 = 0.5 + 0.45 * torch.rand(num_units(shape, scheme))
    g = torch.randn(shape)

    r = r0.clone().requires_grad_(True)
    out = fake_quantize_weight(w, scheme, r)
    out.backward(g)

    rs = r0.clone().requires_grad_(True)
    lo, hi = unit_range(w, scheme)
    wu = to_units(w, scheme)
    fq_u = to_units(out.detach(), scheme)
    lo_e, hi_e = (lo * rs)[:, None], (hi * rs)[:, None]
    wc = torch.minimum(torch.maximum(wu, lo_e), hi_e)
    # out = s * T(w'/s) with T's derivative taken as 1 inside the range: linear in s at fixed T(.)
    s = rs[:, None]
    t = (fq_u / s).detach()  # T(v) in units of the ratio
    v = wc / s
    surrogate = s * (t + v - v.detach())
    pad_mask = torch.ones_like(wu)
    (to_units(g, scheme) * surrogate * pad_mask).sum().backward()
    torch.testing.assert_close(r.grad, rs.grad, rtol=1e-4, atol=1e-5)


def test_ratio_cap():
    """Ratios act within [min_ratio, 1] (1 = plain absmax quantization) and their gradient is linear."""
    scheme = SCHEMES[0]
    w = torch.randn(8, 64)
    n = num_units((8, 64), scheme)
    plain = fake_quantize_weight(w, scheme)
    assert torch.equal(fake_quantize_weight(w, scheme, torch.full((n,), 1.7)), plain)
    assert torch.equal(fake_quantize_weight(w, scheme, torch.ones(n)), plain)
    assert torch.equal(fake_quantize_weight(w, scheme, torch.full((n,), 0.01)),
                       fake_quantize_weight(w, scheme, torch.full((n,), 0.05)))  # fmt: skip
    r = torch.ones(n, requires_grad=True)
    g1, g2 = torch.randn(8, 64), torch.randn(8, 64)
    fake_quantize_weight(w, scheme, r).backward(g1)
    fake_quantize_weight(w, scheme, r).backward(g2)
    acc = r.grad.clone()
    r.grad = None
    fake_quantize_weight(w, scheme, r).backward(g1 + g2)
    torch.testing.assert_close(acc, r.grad)


@given(st.integers(1, 5), st.integers(1, 40), st.sampled_from(DTYPES), st.integers(0, 999))
def test_dynamic_activation_matches_w8a8_reference(m, k, dtype, seed):
    """Per-token int8 fake quant == the quantization inside ``reference.w8a8_linear`` (same scales, same codes)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    n = 7
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    # Low-precision inputs are quantized in fp32 and rounded once to their dtype.
    assert torch.equal(fake_quantize_activation(x), fake_quantize_activation(x.float()).to(dtype))
    x = x.float()
    y_ref = ref.w8a8_linear(x, codes, scale, None, None, n, k)
    w = codes.float() * scale[:, None]
    y_fq = torch.nn.functional.linear(fake_quantize_activation(x), w)
    torch.testing.assert_close(y_fq, y_ref, rtol=1e-5, atol=1e-5)


def test_static_activation_gradient_clips():
    x = torch.tensor([[-3.0, -0.5, 0.2, 2.5]], requires_grad=True)
    scale = torch.tensor(1.0 / 127.0)  # representable range [-1, 1]
    y = fake_quantize_activation(x, scale)
    assert torch.equal(y.detach(), torch.tensor([[-1.0, -0.5, 0.2, 1.0]]).mul(127).round().div(127))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))


def test_observer_moving_average_and_flag():
    running, observed = torch.zeros(()), torch.zeros((), dtype=torch.bool)
    on, off = torch.ones((), dtype=torch.bool), torch.zeros((), dtype=torch.bool)
    s = observe_absmax(torch.tensor([1.0, -4.0]), running, observed, on, 0.25)
    assert running.item() == 4.0 and observed.item() and s.item() == pytest.approx(4.0 / 127)
    observe_absmax(torch.tensor([8.0]), running, observed, on, 0.25)
    assert running.item() == pytest.approx(0.75 * 4.0 + 0.25 * 8.0)
    observe_absmax(torch.tensor([100.0]), running, observed, off, 0.25)  # eval: no update
    assert running.item() == pytest.approx(5.0)


def test_custom_ops_opcheck():
    torch.manual_seed(0)
    w = torch.randn(6, 70, requires_grad=True)
    r = torch.full((num_units((6, 70), SCHEMES[0]),), 0.8, requires_grad=True)
    from qbackend.workflows.qat.fake_quant import scheme_key

    key = scheme_key(SCHEMES[0])
    fast = ("test_schema", "test_autograd_registration", "test_faketensor")  # AOT dispatch: once per op
    torch.library.opcheck(torch.ops.qbackend.qat_fake_quant_weight.default, (w, r, key, 0.05))
    torch.library.opcheck(torch.ops.qbackend.qat_fake_quant_weight.default, (w, None, key, 0.05), test_utils=fast)
    x = torch.randn(3, 5, 70, requires_grad=True)
    torch.library.opcheck(torch.ops.qbackend.qat_fake_quant_act.default, (x, torch.tensor(0.02)))
    torch.library.opcheck(torch.ops.qbackend.qat_fake_quant_act.default, (x, None), test_utils=fast)
