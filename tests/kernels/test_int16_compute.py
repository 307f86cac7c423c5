"""The CPU "int16" compute kernels (qbackend/kernels/cpu/int16_compute.*) against the reference.

Kernel and reference use the same integers (x quantized to int16 per row, int8 codes); the kernel
sums the exact integer products of each block in int32, the reference in fp32 after dequantizing x.
So results agree to fp32 rounding: |y - y_ref| <= 4e-6 * (|x_q| @ |W|^T + |bias|) (plus one ulp of a
16-bit output dtype). Both widths run here: the AVX512-VNNI kernels (where this CPU has them) and
the AVX2 kernels of the library's "avx2" build (what a CPU without AVX-512 runs).
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qbackend
from qbackend.formats import Scheme, quantize
from qbackend.kernels import compute_policy as cp
from qbackend.kernels import prepare_weight, reference
from qbackend.kernels.cpu import _build
from qbackend.kernels.cpu import int16_compute as ic

pytestmark = pytest.mark.skipif(
    ic._lib() is None or _build._compiler() is None, reason="no AVX2 build of the CPU kernels here"
)


def _widths() -> list[tuple[str, object, int]]:
    out = [("avx2", ic.declare(_build.load_variant("avx2")), ic.ISA_AVX2)]
    L, isa = ic._lib()
    if isa == ic.ISA_AVX512_VNNI:
        out.append(("avx512-vnni", L, isa))
    return out


WIDTHS = _widths()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if n > 2:
        w[1] *= 20.0  # an outlier channel
    qw = quantize(w, Scheme("int", bits=8, granularity="channel"))
    codes, scale = prepare_weight(qw, compute="int16").tensors
    return codes, scale


def _reference(x, codes, scale, bias, compute="int16"):
    n, k = scale.numel(), x.shape[-1]
    return reference.int8_linear(x, codes, scale, bias, n, k, compute)


def _assert_matches(y, x, codes, scale, bias) -> None:
    r = _reference(x, codes, scale, bias)
    assert y.dtype == r.dtype and y.shape == r.shape, (y.dtype, r.dtype, y.shape, r.shape)
    n, k = scale.numel(), x.shape[-1]
    xq, s = reference.quantize_activations(x.float().reshape(-1, k), reference.INT16_BLOCK, 32767)
    w = codes.view(n, k).float() * scale.view(-1, 1)
    mag = (xq * s.repeat_interleave(k if reference.INT16_BLOCK is None else reference.INT16_BLOCK, 1)[:, :k]).abs()
    mag = mag @ w.abs().t()
    if bias is not None:
        mag = mag + bias.float().abs()
    tol = 4e-6 * mag.reshape(r.shape) + 1e-30
    if y.dtype != torch.float32:
        tol = tol + r.float().abs() * (2.0**-7 if y.dtype == torch.bfloat16 else 2.0**-10)
    excess = float(((y.float() - r.float()).abs() - tol).max()) if y.numel() else 0.0
    assert excess <= 0, f"max |y - y_ref| over tolerance by {excess:.3g}"


def _run(width, x, codes, scale, bias, gemm_from: int | None = None, packing: bool = False):
    """The kernels of ``width``: the canonical ones (GEMV below ``gemm_from`` rows, else GEMM), or with
    ``packing`` those on the packed weight copy (AVX512-VNNI only; the AVX2 width ignores it)."""
    _name, L, isa = width
    n, k = scale.numel(), x.shape[-1]
    old, old_packing = L.qbi16_gemm_min_m(isa), ic.PACKING
    if gemm_from is not None:
        L.qbi16_set_gemm_min_m(isa, gemm_from)
    ic.PACKING = packing
    try:
        return ic.linear8(L, isa, x, codes, scale, bias, n, k)
    finally:
        L.qbi16_set_gemm_min_m(isa, old)
        ic.PACKING = old_packing


@settings(max_examples=80, deadline=None)
@given(
    wi=st.integers(0, len(WIDTHS) - 1),
    n=st.integers(1, 40),
    k=st.sampled_from([1, 7, 30, 32, 40, 64, 100, 128, 224, 511, 512, 520, 1100]),
    m=st.sampled_from([0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 33, 64, 70]),
    gemm_from=st.sampled_from([None, 1, 10**9]),
    packing=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(wi, n, k, m, gemm_from, packing, dtype, with_bias, seed):
    codes, scale = _weight(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    if m > 2:
        x[2, k // 2] = 300.0  # an outlier activation
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    _assert_matches(_run(WIDTHS[wi], x, codes, scale, bias, gemm_from, packing), x, codes, scale, bias)


@pytest.mark.parametrize("width", WIDTHS, ids=[w[0] for w in WIDTHS])
def test_batch_dims_and_m_zero(width):
    codes, scale = _weight(300, 1536, 3)
    bias = torch.randn(300)
    x = torch.randn(2, 129, 1536)
    y = _run(width, x, codes, scale, bias)
    assert y.shape == (2, 129, 300)
    _assert_matches(y, x, codes, scale, bias)
    empty = torch.randn(0, 4, 1536)
    assert _run(width, empty, codes, scale, bias).shape == (0, 4, 300)


@pytest.mark.parametrize("width", WIDTHS, ids=[w[0] for w in WIDTHS])
def test_no_int32_overflow_over_long_rows(width):
    """Every product at its largest (|x_q| = 32767, |w| = 127, same sign) over K = 16384: one int32 sum
    of the whole row would overflow; the kernels convert every block of <= 512."""
    k = 16384
    codes = torch.full((4 * k,), 127, dtype=torch.int8)
    codes[k : 2 * k] = -127
    scale = torch.full((4,), 0.01)
    x = torch.ones(3, k)
    x[1] = -2.0
    xq, s = reference.quantize_activations(x, reference.INT16_BLOCK, 32767)
    exact = (xq.double() * s.double()) @ (codes.view(4, k).double() * scale.double().view(-1, 1)).t()
    for gemm_from, packing in ((1, False), (10**9, False), (None, True)):
        y = _run(width, x, codes, scale, None, gemm_from, packing)
        # against float64: an fp32 sum of 16384 equal terms (the reference's F.linear) is off by ~2e-5
        assert float(((y.double() - exact).abs() / exact.abs()).max()) < 1e-6
        assert float(y[0, 0]) == pytest.approx(k * 1.27, rel=1e-5)


@pytest.mark.parametrize("width", WIDTHS, ids=[w[0] for w in WIDTHS])
def test_non_finite_rows_as_fp32(width):
    codes, scale = _weight(24, 130, 5)
    x = torch.randn(20, 130)
    x[1, 7] = float("nan")
    x[3, 100] = float("inf")
    x[17, 129] = -float("inf")
    for gemm_from, packing in ((1, False), (10**9, False), (None, True)):
        y = _run(width, x, codes, scale, None, gemm_from, packing)
        y32 = _reference(x, codes, scale, None, "fp32")
        assert torch.equal(torch.isnan(y), torch.isnan(y32)) and torch.equal(torch.isinf(y), torch.isinf(y32))
        assert bool(torch.isnan(y[1]).all()) and not bool(torch.isfinite(y[3]).any())
        good = [i for i in range(20) if i not in (1, 3, 17)]
        _assert_matches(y[good], x[good], codes, scale, None)


@pytest.mark.parametrize("width", WIDTHS, ids=[w[0] for w in WIDTHS])
def test_huge_and_zero_activations(width):
    codes, scale = _weight(16, 256, 7)
    x = torch.randn(4, 256)
    x[0] *= 1e30
    x[2, 5] = 1e30
    x[3] = 0.0
    y = _run(width, x, codes, scale, None, packing=True)
    assert bool(torch.isfinite(_reference(x, codes, scale, None, "fp32")).all())
    assert bool(torch.isfinite(y).all()) and bool((y[3] == 0).all())
    _assert_matches(y, x, codes, scale, None)


def test_only_int8_weights_have_a_kernel_and_the_rest_runs_the_reference():
    ints = {"out_features": 64, "in_features": 256}
    assert ic.has_fast_kernel("int8", ints)
    for fam in ("nf4", "fp4", "int4"):
        assert not ic.has_fast_kernel(fam, {**ints, "blocksize": 64, "groupsize": 64, "nested_blocksize": 256})
    kw = prepare_weight(quantize(torch.randn(64, 256), Scheme("nf4", blocksize=64)), compute="int16")
    x = torch.randn(5, 256)
    y = torch.ops.qbackend.nf4_linear(x, *kw.tensors, None, *kw.statics, "int16")
    assert torch.equal(y, reference.codebook_linear(x, *kw.tensors, None, *kw.statics, "int16"))


def test_int16_adds_far_less_error_than_int8():
    """The mode's point: int8 weights keep their accuracy (random data; MiniLM in compute_policy)."""
    codes, scale = _weight(256, 1024, 9)
    x = torch.randn(16, 1024)
    exact = _reference(x, codes, scale, None, "fp32")
    err = {m: float((_reference(x, codes, scale, None, m) - exact).norm() / exact.norm()) for m in ("int8", "int16")}
    assert err["int16"] < err["int8"] / 50, err


def test_through_the_op_eager_and_inductor():
    codes, scale = _weight(64, 256, 13)
    x = torch.randn(5, 256)
    bias = torch.randn(64)
    y = torch.ops.qbackend.int8_linear(x, codes, scale, bias, 64, 256, "int16")
    _assert_matches(y, x, codes, scale, bias)
    f = torch.compile(lambda x: torch.ops.qbackend.int8_linear(x, codes, scale, bias, 64, 256, "int16"),
                      backend="inductor", fullgraph=True)  # fmt: skip
    _assert_matches(f(x), x, codes, scale, bias)


@pytest.mark.auto_compute
def test_auto_picks_int16_for_int8_weights_and_explain_shows_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    x = torch.randn(4, 256)
    report = qbackend.explain(model, x, preset="int8", min_params=0)
    computes = {r.compute for r in report.layers if r.compute}
    assert computes == {"int16"}, computes
    assert "int16" in str(report)
    with torch.no_grad():
        y_float = model(x)
        qbackend.quantize_(model, {"preset": "int8"})
        y = model(x)
    assert model[0].compute == "int16"
    assert float((y - y_float).norm() / y_float.norm()) < 2e-2


def test_policy_int16_needs_avx2_and_names_what_is_missing(cpu_compute, caplog):
    ints = {"out_features": 1536, "in_features": 384}
    cpu_compute(features={"avx512f", "avx2", "avx512_vnni"}, fast=[("int16", "int8"), ("int8", "int8")])
    assert cp.resolve("auto", "int8", ints).mode == "int16"  # int8 activations: too much added error
    assert cp.resolve("int16", "int8", ints).mode == "int16"
    cpu_compute(features=set(), fast=[("int16", "int8")])
    with pytest.raises(cp.ComputeUnavailable, match=r"'int16' needs AVX2.*lacks.*supports compute = auto, fp32$"):
        cp.resolve("int16", "int8", ints)
    with caplog.at_level(logging.INFO, logger="qbackend"):
        r = cp.resolve("auto", "int8", ints)
    assert r.mode == "fp32" and "AVX2" in r.note


@pytest.mark.auto_compute
def test_auto_runs_every_row_count_in_int16_on_the_packed_kernel(monkeypatch):
    """The packed kernel beats fp32 at every M (compute_policy's docstring): no row count runs in fp32."""
    monkeypatch.setattr(ic, "PACKING", True)
    if not ic.packs():
        pytest.skip("no AVX512-VNNI: the packed int16 kernel does not run here")
    assert cp.fp32_rows("auto", "int8", "int16") is None and cp.call_mode("auto", "int8", "int16", 16) == "int16"
    model = torch.nn.Sequential(torch.nn.Linear(256, 96))
    qbackend.quantize_(model, {"preset": "int8"})
    layer = model[0]
    tensors = [getattr(layer, n) for n in layer._arg_names]
    with torch.no_grad():
        for m in (1, 8, 16, 32, 33):
            x = torch.randn(m, 256)
            assert torch.equal(layer(x), layer.op(x, *tensors, layer.bias, *layer.statics, "int16")), m


@pytest.mark.auto_compute
def test_auto_runs_the_rows_where_int16_is_slower_in_fp32(monkeypatch):
    monkeypatch.setattr(ic, "PACKING", False)  # the canonical kernels (as on a CPU without AVX512-VNNI)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(256, 96))
    qbackend.quantize_(model, {"preset": "int8"})
    layer = model[0]
    assert layer.compute == "int16" and cp.fp32_rows("auto", "int8", "int16") == cp.AUTO_FP32_ROWS[("int8", "int16")]
    lo, hi = cp.AUTO_FP32_ROWS[("int8", "int16")]
    tensors = [getattr(layer, n) for n in layer._arg_names]
    with torch.no_grad():
        for m, mode in ((lo - 1, "int16"), (lo, "fp32"), (hi, "fp32"), (hi + 1, "int16")):
            x = torch.randn(m, 256)
            assert torch.equal(layer(x), layer.op(x, *tensors, layer.bias, *layer.statics, mode)), (m, mode)


@settings(max_examples=30, deadline=None)
@given(
    wi=st.integers(0, len(WIDTHS) - 1),
    n=st.integers(1, 150),
    k=st.sampled_from([7, 32, 100, 512, 520, 1100, 2048]),
    threads=st.sampled_from([1, 2]),
    packing=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decode_rows_one_at_a_time(wi, n, k, threads, packing, seed):
    """M = 1 reads the rows of W one after the other (one stream per thread) with the same per-row slices
    as the tiles of several rows that M = 2 runs: bit-identical to row 0 of an M = 2 call on the same row."""
    codes, scale = _weight(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, k, generator=g) * 3
    bias = torch.randn(n, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y1 = _run(WIDTHS[wi], x, codes, scale, bias, 10**9, packing)
        y2 = _run(WIDTHS[wi], x.expand(2, k).contiguous(), codes, scale, bias, 10**9, packing)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1[0], y2[0]) and torch.equal(y2[0], y2[1])
    _assert_matches(y1, x, codes, scale, bias)


# ---- the packed weight copy (AVX512-VNNI width) -------------------------------------------------------------

needs_vnni = pytest.mark.skipif(WIDTHS[-1][2] != ic.ISA_AVX512_VNNI, reason="no AVX512-VNNI on this CPU")


@needs_vnni
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 150),
    k=st.sampled_from([1, 3, 31, 33, 64, 101, 383, 384, 511, 513, 1025, 1536]),
    m=st.sampled_from([0, 1, 2, 5, 6, 7, 8, 12, 13, 47, 48, 49, 70]),
    threads=st.sampled_from([1, 2]),
    with_bias=st.booleans(),
    bad_rows=st.sampled_from([(), ("nan",), ("inf", "-inf"), ("zero",)]),
    seed=st.integers(0, 2**16),
)
def test_packed_equals_the_gemm_kernel_bit_for_bit(n, k, m, threads, with_bias, bad_rows, seed):
    """N not a multiple of 16/64, K odd or not a multiple of 32 or of the 512-element accumulation block,
    tile heights 1-6, NaN/Inf/zero rows: the packed kernel applies the scales as the canonical GEMM
    (per accumulation block, then the bias), so the results are the same bits, and match the reference."""
    codes, scale = _weight(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g) * 3
    for i, kind in enumerate(bad_rows):
        if i < m:
            x[(seed + 3 * i) % m] = 0.0 if kind == "zero" else x[(seed + 3 * i) % m]
            if kind != "zero":
                x[(seed + 3 * i) % m, (seed + i) % k] = float(kind)
    bias = torch.randn(n, generator=g) if with_bias else None
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        yp = _run(WIDTHS[-1], x, codes, scale, bias, packing=True)
        yg = _run(WIDTHS[-1], x, codes, scale, bias, 1, packing=False)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(yp, yg, rtol=0, atol=0, equal_nan=True)  # the same bits (NaN rows: NaN)
    good = torch.isfinite(x).all(dim=1)
    _assert_matches(yp[good], x[good], codes, scale, bias)
    y32 = _reference(x[~good], codes, scale, bias, "fp32")
    assert torch.equal(torch.isnan(yp[~good]), torch.isnan(y32))
    assert torch.equal(torch.isinf(yp[~good]), torch.isinf(y32))
    if m:
        assert ic.packed_weight(codes, n, k) is not None


@needs_vnni
def test_packed_copy_follows_the_weight():
    n, k = 40, 70
    codes, scale = _weight(n, k, 21)
    codes = codes.clone()  # not a view (a view's copy is keyed on its base)
    x = torch.randn(5, k)
    p1 = ic.packed_weight(codes, n, k)
    assert p1 is not None and p1.numel() == 48 * 96  # n and k rounded up to 16 and 32
    assert p1.data_ptr() % 64 == 0
    assert ic.packed_weight(codes, n, k) is p1  # made once, reused
    _assert_matches(_run(WIDTHS[-1], x, codes, scale, None, packing=True), x, codes, scale, None)
    # an in-place write (as a re-quantization does: copy_ under no_grad) is seen on the next call
    with torch.no_grad():
        codes.copy_(torch.flip(codes, [0]))
    assert ic.packed_weight(codes, n, k) is not p1
    _assert_matches(_run(WIDTHS[-1], x, codes, scale, None, packing=True), x, codes, scale, None)
    codes.view(n, k)[3, 5] = 77
    y = _run(WIDTHS[-1], x, codes, scale, None, packing=True)
    _assert_matches(y, x, codes, scale, None)
    assert torch.equal(y, _run(WIDTHS[-1], x, codes, scale, None, 1, packing=False))
    # freed with the weight
    key = id(codes)
    assert key in ic._CACHE.entries
    held = ic.packed_nbytes()
    assert held >= 48 * 96
    del codes
    gc.collect()
    assert key not in ic._CACHE.entries
    assert ic.packed_nbytes() <= held - 48 * 96


@needs_vnni
def test_packing_can_be_switched_off_and_inference_tensors_are_not_packed(monkeypatch):
    codes, scale = _weight(30, 50, 6)
    x = torch.randn(9, 50)
    monkeypatch.setattr(ic, "PACKING", False)
    assert ic.packed_weight(codes, 30, 50) is None
    monkeypatch.setattr(ic, "PACKING", True)
    with torch.inference_mode():  # no version counter to see an in-place write by: the canonical kernels
        c2, s2 = _weight(20, 33, 4)
        assert ic.packed_weight(c2, 20, 33) is None
        x2 = torch.randn(3, 33)
        _assert_matches(ic.int8_linear(x2, c2, s2, None, 20, 33), x2, c2, s2, None)
        c2.view(20, 33)[0, 0] = -5
        _assert_matches(ic.int8_linear(x2, c2, s2, None, 20, 33), x2, c2, s2, None)
    _assert_matches(ic.int8_linear(x, codes, scale, None, 30, 50), x, codes, scale, None)
