"""The fused kernels of the AVX2 build (qlinear_avx2.cpp) against the reference.

Runs the library built for the "avx2" variant (what a CPU with AVX2 + FMA but no AVX-512 loads) on
any CPU that has AVX2, through the CPU op functions, with the panel fallback disabled: a case the
fused kernels did not take fails instead of silently passing on the fallback. Shapes cover every
tile remainder (M up to 2 tiles + 1, odd N), nested and straddling blocks, affine groups, one group
per row, and int8 rows of any K.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.formats import Scheme, quantize
from qbackend.kernels import cpu, prepare_weight, reference
from qbackend.kernels.cpu import _build, avx2

pytestmark = pytest.mark.skipif(
    _build._compiler() is None or _build.cpu_variant() not in ("avx2", "avx512"),
    reason="needs a C++ compiler and a CPU with AVX2",
)


@pytest.fixture(scope="module")
def avx2_lib():
    return _build.load_variant("avx2")


@pytest.fixture
def fused_only(avx2_lib, monkeypatch):
    """The CPU op functions on the avx2 build with every non-fused path turned into a failure."""

    def no_fallback(*_args, **_kwargs):
        raise AssertionError("the fused AVX2 kernel did not take this case")

    monkeypatch.setattr(cpu, "lib", lambda: avx2_lib)
    monkeypatch.setattr(cpu, "_force_portable", False)
    monkeypatch.setattr(_build, "has_blas", no_fallback)
    monkeypatch.setattr(cpu, "_panel_linear", no_fallback)
    monkeypatch.setattr(cpu, "ref", _NoReference())  # the CPU module's reference fallback
    return avx2_lib


class _NoReference:
    def __getattr__(self, name: str):
        raise AssertionError(f"the CPU op fell back to reference.{name}")


def _scheme(draw, fmt: str, k: int) -> Scheme:
    if fmt in ("nf4", "fp4"):
        return Scheme(fmt, blocksize=draw(st.sampled_from([32, 64, 128, 256])), nested=draw(st.booleans()),
                      nested_blocksize=draw(st.sampled_from([32, 256])))  # fmt: skip
    if fmt == "int4":
        return Scheme("int", bits=4, symmetric=draw(st.booleans()),
                      blocksize=draw(st.sampled_from([32, 64, 128, k])))  # fmt: skip
    return Scheme("int", bits=8, granularity="channel")


@st.composite
def cases(draw, fmt: str):
    """(op function name, forward args, dequantized fp32 weight, bias)."""
    m = draw(st.one_of(st.integers(1, 17), st.sampled_from([1, 64])))
    n = draw(st.integers(1, 40))
    if fmt == "int8":
        k = draw(st.one_of(st.integers(1, 100), st.sampled_from([32, 256])))
    else:
        k = 32 * draw(st.integers(1, 9))  # the fused 4-bit kernels need K % 32 == 0
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = torch.randn(n, k, generator=g)
    if n > 2:
        w[1] *= 20.0  # an outlier channel
    qw = quantize(w, _scheme(draw, fmt, k))
    kw = prepare_weight(qw, "cpu")
    lead = draw(st.sampled_from([(m,), (1, m)]))
    x = torch.randn(*lead, k, generator=g).to(draw(st.sampled_from([torch.float32, torch.float16])))
    bias = torch.randn(n, generator=g) if draw(st.booleans()) else None
    name = {"nf4": "codebook", "fp4": "codebook", "int4": "int4", "int8": "int8"}[fmt] + "_linear"
    return name, (x, *kw.tensors, bias, *kw.statics), qw.dequantize(torch.float32), bias


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int8"])
def test_fused_avx2_kernels_match_the_reference(fused_only, fmt: str) -> None:
    @settings(max_examples=25, deadline=None)
    @given(cases(fmt))
    def check(case) -> None:
        name, args, w, bias = case
        got = getattr(cpu, name)(*args)
        want = getattr(reference, name)(*args)
        assert got.dtype == want.dtype and got.shape == want.shape
        # Equal up to fp32 summation order, relative to sum |x| |w| (+ |bias|); fp16: also y's rounding.
        mag = args[0].float().abs() @ w.abs().t()
        if bias is not None:
            mag = mag + bias.abs()
        tol = 3e-5 * mag + 1e-6
        if got.dtype != torch.float32:
            tol = tol + want.float().abs() * 2.0**-7
        diff = (got.float() - want.float()).abs()
        excess = float((diff - tol).max())
        assert excess <= 0, f"{name}: max excess {excess:.3g}, max |diff| {float(diff.max()):.3g}"

    check()


def test_the_avx2_build_has_its_kernels_and_the_avx512_build_does_not(avx2_lib) -> None:
    assert avx2._declared(avx2_lib)
    if _build.cpu_variant() == "avx512":
        assert not avx2._declared(_build.load_variant("avx512"))


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_avx2_dequantization_is_bit_exact(avx2_lib, fmt: str) -> None:
    # The panels of the large-M and grad-input paths: the reference's decoded weight, bit for bit.
    @settings(max_examples=20, deadline=None)
    @given(st.data())
    def check(data) -> None:
        n, k = data.draw(st.integers(1, 40)), 32 * data.draw(st.integers(1, 9))
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**16))))
        kw = prepare_weight(quantize(w, _scheme(data.draw, fmt, k)), "cpu")
        if fmt == "nf4":
            q, _keep = cpu._qw4_codebook(*kw.tensors, *kw.statics)
            want = reference.decode_codebook(*kw.tensors, *kw.statics)
        else:
            q, _keep = cpu._qw4_int4(*kw.tensors, *kw.statics)
            want = reference.decode_int4(*kw.tensors, *kw.statics)
        n0 = data.draw(st.integers(0, n - 1))
        got = torch.full((n - n0, k), float("nan"))
        avx2_lib.qb4_dequant(ctypes.byref(q), n0, n, got.data_ptr(), 2, 0)
        assert torch.equal(got, want.reshape(n, k)[n0:]), f"{fmt} {n}x{k}: dequantized panel differs"

    check()


def test_large_m_goes_through_avx2_panels(avx2_lib, monkeypatch) -> None:
    monkeypatch.setattr(cpu, "lib", lambda: avx2_lib)
    monkeypatch.setattr(_build, "has_blas", lambda: _build.set_blas(avx2_lib))
    g = torch.Generator().manual_seed(0)
    kw = prepare_weight(quantize(torch.randn(40, 96, generator=g), Scheme("nf4", blocksize=64, nested=True)), "cpu")
    x = torch.randn(cpu.FUSED_MAX_M + 3, 96, generator=g)
    got = cpu.codebook_linear(x, *kw.tensors, None, *kw.statics)
    want = reference.codebook_linear(x, *kw.tensors, None, *kw.statics)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
