"""Anchor: our int4/int8 fake quantization against torchao's (0.18) where both define the same scheme.

Where they coincide: torchao's affine primitives (``choose_qparams_affine`` + ``_fake_quantize_affine``,
what its QAT ``IntxFakeQuantizer`` is built on) with

* SYMMETRIC mapping and an explicit range ``[-(2^(b-1)-1), 2^(b-1)-1]`` (ours): scale
  ``absmax / ((qmax - qmin) / 2) = absmax / qmax``, zero point 0 — int4 per group, int8 per channel;
* ASYMMETRIC mapping, range ``[0, 2^b - 1]`` (ours, affine): scale ``(max(max,0) - min(min,0)) / qmax``,
  integer zero point ``-round(min / scale)`` — int4 affine per group. Our formats compute the scale as
  ``hi / qmax - lo / qmax`` (no overflow near the fp32 max), torchao as ``(hi - lo) / qmax``: the
  scales can differ by one ulp; given the same qparams the fake quantization is the same.

Same values except where ``w / scale`` sits within an ulp of a rounding tie: torchao multiplies by the
reciprocal (``w * (1 / scale)``), we divide (``w / scale``, as our formats and kernels do). The
straight-through gradients agree too (identity with absmax scales; LSQ scale gradients with learned
ranges, except for elements between ``qmax`` and ``qmax + 0.5`` steps, which torchao clamps after
rounding while we clip before).

Where they differ (not compared for equality): torchao's default symmetric range ``[-2^(b-1), 2^(b-1)-1]``
(``IntxFakeQuantizeConfig(torch.int4, group_size=g)``: scale ``absmax / 7.5``, codes -8..7) and its
float-zero-point (tinygemm) asymmetric default; NF4/FP4 and nested constants have no torchao fake quantizer.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

torchao = pytest.importorskip("torchao")
from torchao.quantization.quant_primitives import (  # noqa: E402
    MappingType,
    _fake_quantize_affine,
    choose_qparams_affine,
)

from qbackend.formats import Scheme, quantize  # noqa: E402
from qbackend.workflows.qat.fake_quant import clip_weight, fake_quantize_weight  # noqa: E402
from qbackend.workflows.qat.units import num_units, unit_range  # noqa: E402


def torchao_fake_quant(w: torch.Tensor, scheme: Scheme, scale=None, zero_point=None):
    """(torchao fake-quantized w, scale, zero point) for our int scheme, via torchao's affine primitives;
    ``scale``/``zero_point`` replace torchao's own qparams when given."""
    n, k = w.shape
    block = (1, scheme.blocksize) if scheme.granularity == "block" else (1, k)
    if scheme.symmetric:
        qmin, qmax, mapping = scheme.qmin, scheme.qmax, MappingType.SYMMETRIC
    else:
        qmin, qmax, mapping = 0, scheme.qmax, MappingType.ASYMMETRIC
    s, zp = choose_qparams_affine(w, mapping, block, torch.int32, qmin, qmax, eps=1e-30)
    s = s if scale is None else scale
    zp = zp if zero_point is None else zero_point
    return _fake_quantize_affine(w, block, s, zp, torch.int32, qmin, qmax), s, zp


def _near_tie(w: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Elements whose w/scale is within float error of a .5 rounding tie (reciprocal vs division differ)."""
    n, k = w.shape
    g = scheme.blocksize if scheme.granularity == "block" else k
    v = w / scale.reshape(n, -1).repeat_interleave(g, dim=1)
    frac = (v - v.trunc()).abs()
    return (frac - 0.5).abs() < 1e-4 * v.abs().clamp(min=1)


SCHEMES = [
    Scheme("int", 4, symmetric=True, granularity="block", blocksize=32),
    Scheme("int", 4, symmetric=True, granularity="block", blocksize=128),
    Scheme("int", 4, symmetric=False, granularity="block", blocksize=64),
    Scheme("int", 8, symmetric=True, granularity="channel", axis=0),
    Scheme("int", 8, symmetric=False, granularity="block", blocksize=64),
]


@given(
    scheme=st.sampled_from(SCHEMES),
    rows=st.integers(1, 24),
    groups=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    magnitude=st.sampled_from([1e-2, 1.0, 50.0]),
)
def test_forward_matches_torchao_affine_primitives(scheme, rows, groups, seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    k = (scheme.blocksize if scheme.granularity == "block" else 40) * groups
    w = torch.randn(rows, k, generator=g) * magnitude
    ours = fake_quantize_weight(w, scheme)
    theirs, scale, zp = torchao_fake_quant(w, scheme)
    if not scheme.symmetric:
        qw = quantize(w, scheme)
        torch.testing.assert_close(qw.scale.reshape(-1), scale.reshape(-1), rtol=2.4e-7, atol=0)  # <= 2 ulps
        assert torch.equal(qw.zero_point.reshape(-1).int(), zp.reshape(-1))
        scale = qw.scale.reshape(scale.shape)
        theirs, _, _ = torchao_fake_quant(w, scheme, scale, zp)
    diff = ours != theirs
    assert not (diff & ~_near_tie(w, scale, scheme)).any()
    assert diff.float().mean() < 1e-3


@pytest.mark.parametrize("scheme", SCHEMES[:3], ids=lambda s: s.name)
def test_gradients_match_torchao(scheme):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    upstream = torch.randn(16, 128)

    # Absmax scales: both straight through (identity).
    w1 = w.clone().requires_grad_(True)
    fake_quantize_weight(w1, scheme).backward(upstream)
    w2 = w.clone().requires_grad_(True)
    torchao_fake_quant(w2, scheme)[0].backward(upstream)
    assert torch.equal(w1.grad, upstream)
    torch.testing.assert_close(w2.grad, upstream, rtol=2.4e-7, atol=0)  # torchao: upstream * s * (1/s)

    if not scheme.symmetric:
        return
    # Learned ranges (our clipping ratio r; torchao's range_learning scale s = r * absmax / qmax): LSQ.
    r = torch.full((num_units(tuple(w.shape), scheme),), 0.8, requires_grad=True)
    ours = fake_quantize_weight(w, scheme, r)
    ours.backward(upstream)
    _, hi = unit_range(w, scheme)
    s = ((hi * 0.8) / scheme.qmax).reshape(16, -1).clone().requires_grad_(True)
    theirs, _, _ = torchao_fake_quant(w, scheme, scale=s)
    theirs.backward(upstream)
    near_tie = _near_tie(w, s.detach(), scheme)
    assert torch.equal(ours[~near_tie], theirs[~near_tie])
    # d/dr = d/ds * ds/dr, ds/dr = absmax / qmax; compare groups with no element in (qmax, qmax+0.5] steps.
    v = (w / s.detach().repeat_interleave(scheme.blocksize, dim=1)).abs()
    clean = ~(((v > scheme.qmax) & (v <= scheme.qmax + 0.5)) | near_tie).reshape(-1, scheme.blocksize).any(1)
    assert clean.sum() > 0
    expected = (s.grad.reshape(-1) * hi / scheme.qmax)[clean]
    torch.testing.assert_close(r.grad[clean], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(clip_weight(w, scheme, r.detach()) != w, ~(v <= scheme.qmax))  # our clip set


def test_torchao_default_symmetric_int4_is_a_different_scheme():
    """torchao's IntxFakeQuantizer(int4, symmetric) uses codes -8..7 and scale absmax/7.5: not our format."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

    torch.manual_seed(0)
    w = torch.randn(8, 64)
    theirs = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True))(w)
    ours = fake_quantize_weight(w, Scheme("int", 4, symmetric=True, granularity="block", blocksize=32))
    assert not torch.equal(theirs, ours)
    absmax = w.reshape(8, 2, 32).abs().amax(-1, keepdim=True)
    codes = (theirs.reshape(8, 2, 32) / (absmax / 7.5)).round()
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.allclose(codes * (absmax / 7.5), theirs.reshape(8, 2, 32), atol=1e-6)
