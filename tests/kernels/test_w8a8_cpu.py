"""CPU W8A8 on the exact int8 GEMM (qbackend/kernels/cpu/w8a8.*) against the reference, bit for bit."""

from __future__ import annotations

import gc
from unittest import mock

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


def _no_packing():
    """The canonical-layout kernel (and torch's int8 GEMM for large M): no packed weight copy."""
    return mock.patch.object(w8a8, "packed_weight", lambda *a: None)


@needs_vnni
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "canonical"])
@given(
    st.integers(1, 70),
    st.one_of(st.integers(1, 300), st.sampled_from([64, 128, 192, 1000])),
    st.one_of(st.sampled_from([0, 1]), st.integers(2, 14), st.sampled_from([33, 97])),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_w8a8_kernel_equals_reference(packed, n, k, m, use_bias, static_scale, seed):
    codes, scale = _weight(n, k, seed)
    x = _x(m, k, seed)
    bias = torch.randn(n) if use_bias else None
    act = torch.tensor([0.05]) if static_scale else None
    if packed:
        y = w8a8.w8a8_linear(x, codes, scale, bias, act, n, k)
    else:
        with _no_packing():
            y = w8a8.w8a8_linear(x, codes, scale, bias, act, n, k)
    assert y is not None
    _same(y, reference.w8a8_linear(x, codes, scale, bias, act, n, k))


@needs_vnni
@given(
    st.one_of(st.integers(1, 40), st.sampled_from([15, 16, 17, 63, 64, 65, 384])),
    st.one_of(st.integers(1, 70), st.sampled_from([3, 4, 5, 383, 384, 385])),
    st.one_of(st.integers(1, 14), st.sampled_from([47, 48, 49, 97, 130])),
    st.booleans(),
    st.booleans(),
    st.lists(st.sampled_from(["nan", "inf", "-inf", "zero"]), max_size=3),
    st.integers(0, 2**16),
)
def test_w8a8_packed_tiles_equal_reference(n, k, m, use_bias, static_scale, specials, seed):
    # The packed kernel itself (every tile height 1..6, 1..4 blocks of 16 columns, column and K tails)
    # with NaN/Inf/zero rows, through the fast call and the regular one.
    codes, scale = _weight(n, k, seed)
    x = _x(m, k, seed)
    for i, kind in enumerate(specials):
        row = (seed + 7 * i) % m
        if kind == "zero":
            x[row] = 0.0
        else:
            x[row, (seed + i) % k] = float(kind)
    bias = torch.randn(n) if use_bias else None
    act = torch.tensor([0.05]) if static_scale else None
    r = reference.w8a8_linear(x, codes, scale, bias, act, n, k)
    _same(w8a8.w8a8_linear(x, codes, scale, bias, act, n, k), r)
    fast = w8a8.fast_linear(x, codes, scale, bias, act, n, k)
    if bool(torch.isfinite(r).all()):
        assert fast is not None
        _same(fast, r)
    else:  # non-finite outputs go to the regular path (its overflow retry)
        assert fast is None
    assert w8a8.packed_weight(codes, n, k) is not None


@needs_vnni
def test_w8a8_packed_copy_follows_the_weight():
    n, k = 40, 70
    codes, scale = _weight(n, k, 21)
    codes = codes.clone()  # not a view (a view's copy is keyed on its base)
    x = _x(5, k, 21)
    p1 = w8a8.packed_weight(codes, n, k)
    assert p1 is not None and p1.numel() == 48 * 72  # n and k rounded up to 16 and 4
    assert p1.data_ptr() % 64 == 0
    assert w8a8.packed_weight(codes, n, k) is p1  # made once, reused
    _same(w8a8.fast_linear(x, codes, scale, None, None, n, k), reference.w8a8_linear(x, codes, scale, None, None, n, k))
    # an in-place write (as a re-quantization does: copy_ under no_grad) is seen on the next call
    with torch.no_grad():
        codes.copy_(torch.flip(codes, [0]))
    assert w8a8.packed_weight(codes, n, k) is not p1
    _same(w8a8.fast_linear(x, codes, scale, None, None, n, k), reference.w8a8_linear(x, codes, scale, None, None, n, k))
    codes.view(n, k)[3, 5] = 77
    _same(w8a8.fast_linear(x, codes, scale, None, None, n, k), reference.w8a8_linear(x, codes, scale, None, None, n, k))
    # freed with the weight
    key = id(codes)
    assert key in w8a8._PACKED
    held = w8a8.packed_nbytes()
    assert held >= 48 * 72
    del codes
    gc.collect()
    assert key not in w8a8._PACKED
    assert w8a8.packed_nbytes() <= held - 48 * 72


@needs_vnni
def test_w8a8_packing_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(w8a8, "PACKING", False)
    codes, scale = _weight(30, 50, 6)
    x = _x(200, 50, 6)
    assert w8a8.packed_weight(codes, 30, 50) is None
    _same(w8a8.w8a8_linear(x, codes, scale, None, None, 30, 50),
          reference.w8a8_linear(x, codes, scale, None, None, 30, 50))  # fmt: skip


@needs_vnni
def test_w8a8_packed_copy_of_a_view_made_per_call():
    # callers that pass codes.view(...) each call get the base's one packed copy, and see writes through views
    n, k = 24, 36
    codes, scale = _weight(n, k, 8)
    base = codes.view(n, k)
    x = _x(3, k, 8)
    p1 = w8a8.packed_weight(base.view(-1), n, k)
    assert p1 is not None and w8a8.packed_weight(base.view(-1), n, k) is p1
    base.view(-1)[10] = -100
    assert w8a8.packed_weight(base.view(-1), n, k) is not p1
    _same(w8a8.fast_linear(x, codes.view(-1), scale, None, None, n, k),
          reference.w8a8_linear(x, codes, scale, None, None, n, k))  # fmt: skip
    # a view of only part of a tensor is packed on its own
    big = torch.zeros(2 * n * k, dtype=torch.int8)
    big[n * k :] = codes
    part = big[n * k :]
    _same(w8a8.fast_linear(x, part, scale, None, None, n, k), reference.w8a8_linear(x, codes, scale, None, None, n, k))


@needs_vnni
def test_w8a8_inference_tensor_weight_is_not_packed():
    # no version counter to see an in-place write by: the canonical kernel reads the weight itself
    with torch.inference_mode():
        codes, scale = _weight(20, 33, 4)
        x = _x(9, 33, 4)
        assert w8a8.packed_weight(codes, 20, 33) is None
        _same(w8a8.fast_linear(x, codes, scale, None, None, 20, 33),
              reference.w8a8_linear(x, codes, scale, None, None, 20, 33))  # fmt: skip
        codes.view(20, 33)[0, 0] = -5
        _same(w8a8.fast_linear(x, codes, scale, None, None, 20, 33),
              reference.w8a8_linear(x, codes, scale, None, None, 20, 33))  # fmt: skip


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
@pytest.mark.parametrize("library_min_m", [0, 1 << 30, None], ids=["int_mm", "vnni-tiles", "packed"])
def test_w8a8_large_m_and_the_op_uses_the_kernel(library_min_m, monkeypatch):
    if library_min_m is not None:
        monkeypatch.setattr(w8a8, "LIBRARY_MIN_M", library_min_m)
        monkeypatch.setattr(w8a8, "packed_weight", lambda *a: None)
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
