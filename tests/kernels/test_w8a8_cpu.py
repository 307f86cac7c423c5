"""CPU W8A8 on the exact int8 GEMM (qbackend/kernels/cpu/w8a8.*) against the reference, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qbackend.kernels import cpu, reference
from qbackend.kernels.cpu import w8a8

qb = torch.ops.qbackend

needs_vnni = pytest.mark.skipif(not w8a8.available(), reason="no AVX512-VNNI kernel on this CPU/build")


def _weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if n > 2:
        w[1] *= 30.0  # an outlier channel
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    if n * k > 2:
        codes.view(-1)[2] = -128  # the full int8 range is legal in a checkpoint
    return codes.view(-1), scale


def _x(m: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(m, k, generator=g) * 3).to(dtype)


def _same(y: torch.Tensor, r: torch.Tensor) -> None:
    assert y.dtype == r.dtype and y.shape == r.shape, (y.dtype, r.dtype, y.shape, r.shape)
    assert torch.equal(y.isnan(), r.isnan())
    ok = ~r.isnan()
    diff = float((y[ok].float() - r[ok].float()).abs().max()) if bool(ok.any()) else 0.0
    assert torch.equal(y[ok], r[ok]), f"max |diff| {diff:.3g}"


@needs_vnni
@given(
    st.integers(1, 70),
    st.one_of(st.integers(1, 300), st.sampled_from([64, 128, 192, 1000])),
    st.one_of(st.sampled_from([0, 1]), st.integers(2, 14), st.sampled_from([33, 97])),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_w8a8_kernel_equals_reference(n, k, m, use_bias, static_scale, seed):
    codes, scale = _weight(n, k, seed)
    x = _x(m, k, seed)
    bias = torch.randn(n) if use_bias else None
    act = torch.tensor([0.05]) if static_scale else None
    y = w8a8.w8a8_linear(x, codes, scale, bias, act, n, k)
    assert y is not None
    _same(y, reference.w8a8_linear(x, codes, scale, bias, act, n, k))


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_op_16bit_and_3d_input(dtype):
    n, k = 37, 200
    codes, scale = _weight(n, k, 3)
    x = _x(6, k, 3, dtype).view(2, 3, k)
    bias = torch.randn(n).to(dtype)
    y = qb.w8a8_linear(x, codes, scale, bias, None, n, k)
    _same(y, reference.w8a8_linear(x, codes, scale, bias, None, n, k))


@needs_vnni
@pytest.mark.parametrize("static_scale", [False, True])
def test_w8a8_nonfinite_and_huge_activations(static_scale, monkeypatch):
    n, k = 19, 130
    codes, scale = _weight(n, k, 5)
    x = _x(7, k, 5)
    x[1, 7] = float("nan")
    x[2, 100] = float("inf")
    x[3, 0] = -float("inf")
    x[4] *= 1e32 / float(x[4].abs().max())  # huge, and so is the result, still finite as in the reference
    x[6] *= 1e36 / float(x[6].abs().max())  # float(acc) * s_x overflows in the raw kernel
    x[5] = 0.0
    act = torch.tensor([0.05]) if static_scale else None
    y = w8a8.w8a8_linear(x, codes, scale, None, act, n, k)
    r = reference.w8a8_linear(x, codes, scale, None, act, n, k)
    rows = [i for i in range(7) if i != 6]
    _same(y[rows], r[rows])
    # Row 6 overflows in the raw kernel; the registered op reruns it scaled down, finite like the reference.
    op = torch.ops.qbackend.w8a8_linear(x, codes, scale, None, act, n, k)
    _same(op[rows], r[rows])
    assert torch.equal(torch.isfinite(op[6]), torch.isfinite(r[6]))
    torch.testing.assert_close(op[6], r[6], rtol=1e-5, atol=0.0)
    assert bool(torch.isfinite(y[4]).all()) and bool(torch.isfinite(y[0]).all())
    assert bool(y[1].isnan().all())
    assert bool((y[5] == 0).all())


@needs_vnni
@pytest.mark.parametrize("act", [0.0, float("inf"), float("nan")])
def test_w8a8_degenerate_static_scale(act):
    codes, scale = _weight(8, 64, 1)
    x = _x(3, 64, 1)
    a = torch.tensor([act])
    _same(w8a8.w8a8_linear(x, codes, scale, None, a, 8, 64), reference.w8a8_linear(x, codes, scale, None, a, 8, 64))


@needs_vnni
@pytest.mark.parametrize("library_min_m", [0, 1 << 30], ids=["int_mm", "vnni-tiles"])
def test_w8a8_large_m_and_the_op_uses_the_kernel(library_min_m, monkeypatch):
    monkeypatch.setattr(w8a8, "LIBRARY_MIN_M", library_min_m)
    n, k, m = 130, 520, 300
    codes, scale = _weight(n, k, 9)
    x = _x(m, k, 9)
    calls = []
    real = w8a8.w8a8_linear
    monkeypatch.setattr(w8a8, "w8a8_linear", lambda *a: calls.append(1) or real(*a))
    y = qb.w8a8_linear(x, codes, scale, None, None, n, k)
    assert calls, "the CPU op did not call the VNNI kernel"
    _same(y, reference.w8a8_linear(x, codes, scale, None, None, n, k))


def test_w8a8_falls_back_where_the_kernel_does_not_run(monkeypatch):
    # No kernel (no VNNI / K too long for int32): the op's own fp32 path still matches the reference.
    monkeypatch.setattr(w8a8, "w8a8_linear", lambda *a: None)
    n, k = 9, 100
    codes, scale = _weight(n, k, 2)
    x = _x(4, k, 2)
    y = cpu.w8a8_linear(x, codes, scale, None, None, n, k)
    torch.testing.assert_close(y, reference.w8a8_linear(x, codes, scale, None, None, n, k), rtol=1e-5, atol=1e-5)


@needs_vnni
def test_w8a8_k_beyond_int32_range_is_refused():
    codes, scale = _weight(1, 131073, 4)
    assert w8a8.w8a8_linear(_x(1, 131073, 4), codes, scale, None, None, 1, 131073) is None


@needs_vnni
def test_w8a8_outlier_composite_still_works():
    n, k = 24, 96
    codes, scale = _weight(n, k, 11)
    x = _x(5, k, 11)
    x[:, 3] = 40.0  # an outlier column
    y = qb.w8a8_outlier_linear(x, codes, scale, None, None, 6.0, n, k)
    r = reference.w8a8_outlier_linear(x, codes, scale, None, None, 6.0, n, k)
    torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-4)
