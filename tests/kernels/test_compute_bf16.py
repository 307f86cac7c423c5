"""The "bf16" compute mode's CPU kernels (qbackend/kernels/cpu/bf16_compute.*) against the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.formats import Scheme, quantize
from qbackend.kernels import family_of, prepare_weight, quantized_linear, reference
from qbackend.kernels.cpu import bf16_compute, compute

needs_bf16 = pytest.mark.skipif(not bf16_compute.available(), reason="no AVX512-BF16 kernel on this CPU/build")

codebook_schemes = st.builds(
    lambda kind, bs, nested: Scheme(kind, blocksize=bs, nested=nested),
    st.sampled_from(["nf4", "fp4"]),
    st.sampled_from([32, 64, 128]),
    st.booleans(),
)
int4_schemes = st.one_of(
    st.builds(
        lambda g, sym: Scheme("int", bits=4, symmetric=sym, granularity="block", blocksize=g),
        st.sampled_from([8, 16, 32, 128, 6, 96]),
        st.booleans(),
    ),
    st.builds(lambda sym: Scheme("int", bits=4, symmetric=sym, granularity="channel"), st.booleans()),
)
int8_schemes = st.just(Scheme("int", bits=8, granularity="channel"))
all_schemes = st.one_of(codebook_schemes, int4_schemes, int8_schemes)
dims = st.integers(1, 70)
# K: multiples of 8 (the fused kernel), of 128 plus a tail, and odd widths (the reference fallback).
widths = st.one_of(st.sampled_from([8, 40, 128, 136, 264, 392]), st.integers(1, 300))
rows = st.one_of(st.sampled_from([0, 1]), st.integers(2, 8), st.sampled_from([13, 33]))


def _case(scheme: Scheme, n: int, k: int, m: int, seed: int, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if n > 2:
        w[1] *= 20.0
    qw = quantize(w, scheme)
    kw = prepare_weight(qw, compute="bf16")
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ref_fn = getattr(reference, family_of(kw.op).kernel + "_linear")
    y_ref = ref_fn(x, *kw.tensors, b, *kw.scalars)  # the scalars end with compute="bf16"
    mag = x.float().abs() @ qw.dequantize(torch.float32).abs().t()
    if b is not None:
        mag = mag + b.float().abs()
    return kw, x, b, y_ref, mag


def _check(y: torch.Tensor, y_ref: torch.Tensor, mag: torch.Tensor, weight_rounded: bool, what: str) -> None:
    """The reference's "bf16" operands up to fp32 summation order; with ``weight_rounded`` the decoded
    weight may also be rounded to bf16 (a relative 2^-8 per product, as the contract allows)."""
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape, (y.dtype, y_ref.dtype, y.shape, y_ref.shape)
    tol = (2.0**-8 if weight_rounded else 3e-5) * mag + 1e-5
    if y.dtype != torch.float32:
        tol = tol + y_ref.float().abs() * 2.0**-7
    excess = float(((y.float() - y_ref.float()).abs() - tol).max()) if y.numel() else 0.0
    assert excess <= 0, f"{what}: max excess {excess:.3g}"


@needs_bf16
@given(all_schemes, dims, widths, rows, st.booleans(), st.integers(0, 2**16))
def test_fused_kernel_matches_reference(scheme, n, k, m, use_bias, seed):
    kw, x, b, y_ref, mag = _case(scheme, n, k, m, seed, bias=use_bias)
    y = quantized_linear(x, kw, b)
    _check(y, y_ref, mag, weight_rounded=False, what=f"{scheme.name} N={n} K={k} M={m}")


@needs_bf16
@settings(max_examples=30)
@given(all_schemes, dims, st.sampled_from([8, 136, 264, 100]), st.integers(0, 2**16))
def test_large_m_panel_path_matches_reference(scheme, n, k, seed):
    kw, x, b, y_ref, mag = _case(scheme, n, k, 11, seed)
    old = bf16_compute.FUSED_MAX_M
    bf16_compute.FUSED_MAX_M = 4  # M = 11 takes the bf16-panel + MKL path
    try:
        y = quantized_linear(x, kw, b)
    finally:
        bf16_compute.FUSED_MAX_M = old
    _check(y, y_ref, mag, weight_rounded=True, what=f"{scheme.name} N={n} K={k} panels")


@needs_bf16
@pytest.mark.parametrize("fused_max_m", [1 << 62, 4], ids=["fused", "mkl-panels"])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_bf16_int8_kernel_matches_reference(m, fused_max_m, monkeypatch):
    # int8 weights run the fp32 int8 kernel on bf16 x by default; this module's own bf16 int8 kernel
    # (USE_BF16_INT8) is kept and checked here.
    monkeypatch.setattr(bf16_compute, "USE_BF16_INT8", True)
    monkeypatch.setattr(bf16_compute, "FUSED_MAX_M", fused_max_m)
    for n, k in [(37, 200), (5, 7), (64, 256)]:
        kw, x, b, y_ref, mag = _case(Scheme("int", bits=8, granularity="channel"), n, k, m, n + k)
        _check(quantized_linear(x, kw, b), y_ref, mag, fused_max_m == 4, f"int8 N={n} K={k} M={m}")


@needs_bf16
def test_panel_path_uses_mkl_bf16_gemm():
    assert bf16_compute._has_gemm(), "MKL's cblas_gemm_bf16bf16f32 was not found or failed its check"


@needs_bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", [Scheme("nf4", nested=True), Scheme("int", bits=8, granularity="channel")],
                         ids=lambda s: s.name)  # fmt: skip
def test_16bit_and_3d_inputs(scheme, dtype):
    kw, x, b, _, mag = _case(scheme, 24, 136, 6, 3, dtype=dtype)
    x3 = x.view(2, 3, 136)
    y = quantized_linear(x3, kw, b)
    ref_fn = getattr(reference, family_of(kw.op).kernel + "_linear")
    _check(y.view(6, 24), ref_fn(x3, *kw.tensors, b, *kw.scalars).view(6, 24), mag, False, "16-bit")


@needs_bf16
@pytest.mark.parametrize("scheme", [Scheme("nf4"), Scheme("int", bits=4, symmetric=False, blocksize=32),
                                    Scheme("int", bits=8, granularity="channel")], ids=lambda s: s.name)  # fmt: skip
def test_nonfinite_rows_stay_nonfinite(scheme):
    kw, x, b, _, _ = _case(scheme, 16, 128, 3, 1)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    y = quantized_linear(x, kw, b)
    assert bool(torch.isfinite(y[0]).all())
    assert bool(y[1].isnan().all())
    assert not bool(torch.isfinite(y[2]).all())


@needs_bf16
def test_error_against_fp32_is_far_below_the_format_error():
    # the contract's point: bf16 arithmetic adds an error far below NF4's own weight error
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    x = torch.randn(16, 512, generator=g)
    qw = quantize(w, Scheme("nf4", nested=True))
    exact = x @ w.t()
    y32 = quantized_linear(x, prepare_weight(qw, compute="fp32"))
    y16 = quantized_linear(x, prepare_weight(qw, compute="bf16"))
    format_err = float((y32 - exact).norm() / exact.norm())
    bf16_err = float((y16 - y32).norm() / y32.norm())
    assert bf16_err < format_err / 10, (bf16_err, format_err)


def test_has_fast_kernel_answers():
    avail = bf16_compute.available()
    assert compute.has_fast_kernel("bf16", "nf4", {"in_features": 4096, "out_features": 4096, "blocksize": 64}) == avail
    assert compute.has_fast_kernel("bf16", "int8", {"in_features": 7, "out_features": 3}) == avail
    assert not bf16_compute.has_fast_kernel("nf4", {"in_features": 100, "out_features": 8, "blocksize": 64})
    assert not bf16_compute.has_fast_kernel("int4", {"in_features": 96, "out_features": 8, "groupsize": 6})
    assert bf16_compute.has_fast_kernel("int4", {"in_features": 96, "out_features": 8, "groupsize": 96}) == avail
