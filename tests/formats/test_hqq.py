"""HQQ numerics (:mod:`qbackend.formats.hqq`): calibration-free refinement of 4-bit constants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.formats import FormatError, Scheme, quantize
from qbackend.formats.hqq import hqq_quantize, shrink_lp
from qbackend.kernels import prepare_weight
from qbackend.passes.weight_cache import dequantize_kernel_weight

SCHEMES = [
    Scheme("nf4", 4, blocksize=64),
    Scheme("fp4", 4, blocksize=64),
    Scheme("int", 4, symmetric=False, granularity="block", blocksize=128),
    Scheme("int", 4, symmetric=True, granularity="block", blocksize=32),
    Scheme("int", 4, symmetric=False, granularity="channel", axis=0),
]
IDS = [s.name for s in SCHEMES]


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return torch.where(torch.rand(n, k, generator=g) < 0.01, w * 8, w)  # a few outliers, as in trained weights


def _lp(w: torch.Tensor, deq: torch.Tensor, p: float) -> float:
    return float((w - deq).abs().pow(p).sum())


def _same_weight(a, b) -> bool:
    pairs = [(a.codes, b.codes), (a.scale, b.scale), (a.zero_point, b.zero_point)]
    if a.nested is not None or b.nested is not None:
        pairs += [(a.nested.codes, b.nested.codes), (a.nested.absmax2, b.nested.absmax2)]
    return all((x is None and y is None) or torch.equal(x.reshape(-1), y.reshape(-1)) for x, y in pairs)


@settings(max_examples=30, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    n=st.integers(1, 24),
    k=st.integers(2, 200),  # tails: groups and blocks that do not divide K, blocks across rows
    p=st.sampled_from([0.5, 0.7, 1.0]),
    beta=st.sampled_from([10.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_objective_never_worse_than_round_to_nearest(scheme, n, k, p, beta, seed):
    w = _weight(n, k, seed)
    out = hqq_quantize(w, scheme, lp_norm=p, beta=beta, iters=8)
    rtn = quantize(w, scheme)
    out.qweight.validate("w")
    assert out.rtn_objective == pytest.approx(_lp(w, rtn.dequantize(torch.float32), p), rel=1e-6)
    assert out.objective == pytest.approx(_lp(w, out.qweight.dequantize(torch.float32), p), rel=1e-6)
    assert out.objective <= out.rtn_objective * (1 + 1e-6)
    if out.changed == 0:
        assert _same_weight(out.qweight, rtn)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_the_solver_moves_constants_and_lowers_the_objective_on_a_real_sized_layer(scheme):
    w = _weight(96, 512, 3)
    out = hqq_quantize(w, scheme)
    assert out.changed > out.units // 10 and out.objective < 0.99 * out.rtn_objective


@pytest.mark.parametrize("scheme", [*SCHEMES, Scheme("nf4", 4, blocksize=64, nested=True)], ids=[*IDS, "nf4-nested"])
def test_no_iterations_is_round_to_nearest_bit_for_bit(scheme):
    w = _weight(7, 200, 1)
    assert _same_weight(hqq_quantize(w, scheme, iters=0).qweight, quantize(w, scheme))


@pytest.mark.parametrize("scheme", [*SCHEMES, Scheme("nf4", 4, blocksize=64, nested=True)], ids=[*IDS, "nf4-nested"])
@pytest.mark.parametrize("shape", [(48, 192), (7, 33)])
def test_refined_weights_decode_bit_exactly_through_the_kernels(scheme, shape):
    w = _weight(*shape, 4)
    qw = hqq_quantize(w, scheme).qweight
    kw = prepare_weight(qw)
    assert torch.equal(dequantize_kernel_weight(kw), qw.dequantize(torch.float32))
    x = torch.randn(5, shape[1])
    torch.testing.assert_close(kw.op(x, *kw.tensors, None, *kw.statics), x @ qw.dequantize(torch.float32).t(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_shrink_is_the_lp_proximal_step():
    x = torch.tensor([-1.0, -0.01, 0.0, 0.01, 1.0])
    assert torch.equal(shrink_lp(x, 10.0, 1.0), torch.tensor([-0.9, 0.0, 0.0, 0.0, 0.9]))
    y = shrink_lp(x, 10.0, 0.7)
    assert y[1] == y[2] == y[3] == 0 and 0.8 < float(y[4]) < 1.0 and float(y[0]) == -float(y[4])


def test_unsupported_formats_and_bad_options_are_errors_naming_the_layer():
    w = _weight(8, 64, 0)
    with pytest.raises(FormatError, match="enc.0.fc: method 'hqq' refines nf4, fp4, int4 only; got int8-sym-ch0"):
        hqq_quantize(w, Scheme("int", 8, symmetric=True, granularity="channel"), name="enc.0.fc")
    with pytest.raises(FormatError, match="fc: HQQ needs 0 < lp_norm <= 1"):
        hqq_quantize(w, SCHEMES[0], lp_norm=2.0, name="fc")
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FormatError, match="fc: contains 1 NaN/Inf"):
        hqq_quantize(bad, SCHEMES[0], name="fc")
