"""GPTQ numerics (:mod:`qbackend.formats.gptq`) and the per-element grid it rounds on (:mod:`qbackend.formats.grid`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.formats import Scheme, quantize
from qbackend.formats.gptq import CalibrationDataError, gptq_quantize, output_error
from qbackend.formats.grid import grid_from_weight
from qbackend.kernels import prepare_weight

SCHEMES = [
    Scheme("nf4", 4, blocksize=64, nested=True),
    Scheme("fp4", 4, blocksize=64),
    Scheme("int", 4, symmetric=False, granularity="block", blocksize=128),
    Scheme("int", 4, symmetric=True, granularity="block", blocksize=32),
    Scheme("int", 8, symmetric=True, granularity="channel", axis=0),
]
IDS = [s.name for s in SCHEMES]


def _same_weight(a, b) -> bool:
    pairs = [(a.codes, b.codes), (a.scale, b.scale), (a.zero_point, b.zero_point)]
    if a.nested is not None or b.nested is not None:
        pairs += [(a.nested.codes, b.nested.codes), (a.nested.absmax2, b.nested.absmax2)]
    return all((x is None and y is None) or torch.equal(x.reshape(-1), y.reshape(-1)) for x, y in pairs)


def _hessian(k: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) * (0.2 + 3 * torch.rand(k, generator=g)) + torch.randn(k, generator=g)
    return x.t() @ x / tokens


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.parametrize("shape", [(16, 128), (7, 33), (33, 200)])  # tail blocks/groups, blocks across rows
def test_grid_encodes_round_to_nearest_bit_for_bit(scheme, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grid = grid_from_weight(w, scheme)
    codes, deq = grid.encode(w)
    qw = grid.to_qweight(codes, w.dtype)
    ref = quantize(w, scheme)
    assert _same_weight(qw, ref)
    if not scheme.nested:
        assert torch.equal(deq, ref.dequantize(torch.float32))


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape", [(24, 256), (9, 100)])
def test_identity_hessian_is_round_to_nearest(scheme, act_order, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out = gptq_quantize(w, torch.eye(shape[1]), scheme, damp=0.0, act_order=act_order)
    assert _same_weight(out.qweight, quantize(w, scheme))


@settings(max_examples=25, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    n=st.integers(1, 40),
    k=st.integers(8, 160),
    act_order=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_output_error_never_worse_than_round_to_nearest(scheme, n, k, act_order, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    h = _hessian(k, 4 * k, seed)
    out = gptq_quantize(w, h, scheme, act_order=act_order)
    rtn = output_error(w, quantize(w, scheme).dequantize(torch.float32), h)
    assert out.rtn_error == pytest.approx(rtn, rel=1e-5)
    assert out.error <= rtn * (1 + 1e-6)
    assert out.error == pytest.approx(output_error(w, out.qweight.dequantize(torch.float32), h), rel=1e-5)
    if out.kept_rtn:
        assert _same_weight(out.qweight, quantize(w, scheme))


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_gptq_itself_beats_round_to_nearest_on_correlated_inputs(scheme):
    """The fallback above is for degenerate problems: on a real-sized layer GPTQ's own weight wins clearly."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(256, 256, generator=g) / 16 + torch.eye(256)
    x = (torch.randn(2048, 256, generator=g) * (0.2 + 3 * torch.rand(256, generator=g))) @ mix
    out = gptq_quantize(torch.randn(64, 256, generator=g), x.t() @ x / 2048, scheme)
    assert not out.kept_rtn and out.error < 0.9 * out.rtn_error


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_act_order_weight_decodes_and_runs_in_the_kernel(scheme):
    torch.manual_seed(3)
    w, h = torch.randn(48, 192), _hessian(192, 800, 3)
    out = gptq_quantize(w, h, scheme, act_order=True)
    qw = out.qweight
    qw.validate("w")
    deq = qw.dequantize(torch.float32)
    # what GPTQ reports is the error of the stored weight, and the kernel computes with that weight
    assert out.error == pytest.approx(output_error(w, deq, h), rel=1e-5)
    kw = prepare_weight(qw)
    x = torch.randn(5, 192)
    torch.testing.assert_close(kw.op(x, *kw.tensors, None, *kw.statics), x @ deq.t(), rtol=1e-5, atol=1e-5)
    # act-order permutes the rounding order, never the stored layout: an unpermuted weight's codes
    assert out.error < out.rtn_error and qw.shape == (48, 192)


def test_dead_inputs_do_not_spread_error_and_keep_their_weights():
    torch.manual_seed(4)
    scheme = SCHEMES[2]
    w, h = torch.randn(16, 128), _hessian(128, 600, 4)
    h[:, 5] = 0
    h[5, :] = 0
    out = gptq_quantize(w, h, scheme)
    deq = out.qweight.dequantize(torch.float32)
    assert torch.isfinite(deq).all()
    assert out.error <= out.rtn_error


def test_singular_hessian_names_the_layer():
    h = torch.ones(64, 64)  # rank 1: not positive definite without dampening
    with pytest.raises(CalibrationDataError, match="enc.fc.*singular.*damp"):
        gptq_quantize(torch.randn(8, 64), h, SCHEMES[0], damp=0.0, name="enc.fc")


def test_bad_hessians_name_the_layer():
    w = torch.randn(8, 64)
    with pytest.raises(CalibrationDataError, match="enc.fc.*64 inputs"):
        gptq_quantize(w, torch.eye(32), SCHEMES[0], name="enc.fc")
    with pytest.raises(CalibrationDataError, match="enc.fc.*zero"):
        gptq_quantize(w, torch.zeros(64, 64), SCHEMES[0], name="enc.fc")
    with pytest.raises(CalibrationDataError, match="enc.fc.*NaN"):
        gptq_quantize(w, torch.full((64, 64), float("nan")), SCHEMES[0], name="enc.fc")
