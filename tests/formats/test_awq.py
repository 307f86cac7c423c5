"""AWQ numerics (:mod:`qbackend.formats.awq`): scale search, clip search, the round-to-nearest guarantee."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.formats import Scheme, quantize
from qbackend.formats.awq import awq_quantize, awq_scale, clip_units, search_scale
from qbackend.formats.gptq import CalibrationDataError
from qbackend.formats.scheme import FormatError

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


def _inputs(k: int, tokens: int, seed: int, outliers: float = 3.0) -> torch.Tensor:
    """Activations with per-channel magnitudes spread like a transformer's (a few large channels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, k, generator=g) * (0.1 + outliers * torch.rand(k, generator=g) ** 4)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.t() @ x / x.shape[0], x.abs().mean(dim=0)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.parametrize("shape", [(16, 128), (7, 33), (33, 200)])  # tail blocks/groups, blocks across rows
def test_awq_with_all_scales_one_and_no_clipping_is_round_to_nearest_exactly(scheme, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    h, mean = _stats(_inputs(shape[1], 256, 2))
    out = awq_quantize(w, h, mean, scheme, grid=1, duo=False, clip=False)  # grid=1: alpha = 0 only, s = 1
    assert out.alpha == 0 and out.input_scale is None and bool((out.scale == 1).all())
    assert _same_weight(out.qweight, quantize(w, scheme))
    assert awq_scale(mean, 0.0).eq(1).all()


def _output_error(x, w, deq, input_scale):
    y = x @ w.t()
    xs = x if input_scale is None else x * input_scale
    return float((y - xs @ deq.t()).norm() / y.norm())


@settings(max_examples=20, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    n=st.integers(1, 40),
    k=st.integers(8, 160),
    tokens=st.integers(16, 300),
    seed=st.integers(0, 2**16),
)
def test_never_worse_than_round_to_nearest_on_the_calibration_inputs(scheme, n, k, tokens, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    x = _inputs(k, tokens, seed + 1)
    h, mean = _stats(x)
    out = awq_quantize(w, h, mean, scheme, grid=8)
    assert out.error <= out.rtn_error
    # measured directly on the inputs, with the explicit multiply the layer applies
    awq_err = _output_error(x, w, out.qweight.dequantize(torch.float32), out.input_scale)
    rtn_err = _output_error(x, w, quantize(w, scheme).dequantize(torch.float32), None)
    assert awq_err <= rtn_err * (1 + 1e-4) + 1e-6
    assert abs(awq_err - out.error) <= 1e-3 * max(out.error, 1e-3)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_outlier_channels_make_awq_clearly_better_than_round_to_nearest(scheme):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    h, mean = _stats(_inputs(256, 1024, 4, outliers=20.0))
    out = awq_quantize(w, h, mean, scheme)
    assert not out.kept_rtn and out.input_scale is not None
    assert out.error < 0.9 * out.rtn_error
    assert out.clip == (clip_units(scheme, 256) is not None)


def test_the_scale_search_starts_at_round_to_nearest_and_picks_its_minimum():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    h, mean = _stats(_inputs(64, 512, 6, outliers=10.0))
    scheme = SCHEMES[2]
    alpha, s, losses, duo = search_scale([w], h, mean, scheme, grid=10, duo=False)
    assert len(losses) == 10 and not duo
    assert min(losses) == losses[int(round(alpha * 10))] and min(losses) <= losses[0]
    torch.testing.assert_close(s, awq_scale(mean, alpha))
    duo_alpha, duo_s, duo_losses, by_weight = search_scale([w], h, mean, scheme, grid=10, duo=True)
    assert len(duo_losses) == 11 and duo_losses[0] == losses[0]  # s = 1 first, then the duo family
    assert min(duo_losses) == duo_losses[0 if not by_weight else 1 + int(round(duo_alpha * 10))]


def test_statistics_that_do_not_fit_and_bad_options_are_errors_naming_the_layer():
    w = torch.randn(8, 64)
    h, mean = _stats(_inputs(64, 128, 7))
    with pytest.raises(CalibrationDataError, match="blk.fc: the calibration's statistics are for 32 inputs"):
        awq_quantize(w, h[:32, :32], mean[:32], SCHEMES[0], name="blk.fc")
    with pytest.raises(CalibrationDataError, match="blk.fc: .*NaN/Inf"):
        awq_quantize(w, h, mean * float("nan"), SCHEMES[0], name="blk.fc")
    with pytest.raises(FormatError, match="blk.fc: contains NaN/Inf"):
        awq_quantize(w * float("inf"), h, mean, SCHEMES[0], name="blk.fc")
    with pytest.raises(FormatError, match="max_shrink"):
        awq_quantize(w, h, mean, SCHEMES[0], max_shrink=1.5, name="blk.fc")
