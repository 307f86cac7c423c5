"""torch.ops.qbackend.* quantized linears: CPU kernels vs the reference, opcheck, autograd, errors, API."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from qbackend.formats import QuantizedWeight, Scheme, quantize
from qbackend.kernels import (
    KernelWeight,
    UnsupportedWeight,
    cpu,
    cuda,
    family_of,
    ops,
    prepare_weight,
    quantized_linear,
    reference,
    supported,
)

qb = torch.ops.qbackend


@pytest.fixture(scope="session", autouse=True)
def _built_library():
    """Build (or load the cached) C++ kernels once per session, outside any timed test."""
    return cpu.lib()


def test_cpu_library_builds():
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the ops run the pure-torch path")
    assert cpu.lib() is not None, "C++ CPU kernels failed to build; see the qbackend warning in the log"


# ---- helpers -------------------------------------------------------------------------------------


def _weight(n: int, k: int, scheme: Scheme, seed: int) -> tuple[QuantizedWeight, KernelWeight]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if n > 2:
        w[1] *= 20.0  # an outlier channel
    qw = quantize(w, scheme)
    return qw, prepare_weight(qw)


def _reference_fn(kw: KernelWeight):
    return getattr(reference, family_of(kw.op).kernel + "_linear")


def _assert_close(y: torch.Tensor, y_ref: torch.Tensor, mag: torch.Tensor, what: str = "") -> None:
    """Equal up to fp32 summation order (relative to sum |x||w|) and, for 16-bit outputs, one ulp."""
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape, (y.dtype, y_ref.dtype, y.shape, y_ref.shape)
    yf, rf = y.float(), y_ref.float()
    tol = 3e-5 * mag + 1e-6
    if y.dtype != torch.float32:
        tol = tol + rf.abs() * 2.0**-7
    err = (yf - rf).abs() - tol
    worst = float((yf - rf).abs().max())
    assert float(err.max()) <= 0, f"{what}: max excess {float(err.max()):.3g}, max |diff| {worst:.3g}"


def _mag(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m = x.float().abs() @ w.abs().t()
    return m if bias is None else m + bias.float().abs()


def _x(shape: tuple[int, ...], dtype: torch.dtype, seed: int, noncontig: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    if noncontig:  # a transposed view: x.stride(-1) != 1
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).to(dtype).transpose(-1, -2)
    return torch.randn(*shape, generator=g).to(dtype)


# ---- strategies ----------------------------------------------------------------------------------

dims = st.integers(1, 72)
widths = st.one_of(st.integers(1, 300), st.sampled_from([128, 256, 136, 264]))
rows = st.one_of(st.just(1), st.integers(2, 8), st.sampled_from([13, 33]))
dtypes = st.sampled_from([torch.float32, torch.bfloat16])

codebook_schemes = st.builds(
    lambda kind, bs, nested, nbs: Scheme(kind, blocksize=bs, nested=nested, nested_blocksize=nbs),
    st.sampled_from(["nf4", "fp4"]),
    st.sampled_from([32, 64, 128]),
    st.booleans(),
    st.sampled_from([32, 256]),
)
int4_schemes = st.one_of(
    st.builds(
        lambda g, sym: Scheme("int", bits=4, symmetric=sym, granularity="block", blocksize=g),
        st.sampled_from([8, 16, 32, 64, 128, 6, 96]),
        st.booleans(),
    ),
    st.builds(lambda sym: Scheme("int", bits=4, symmetric=sym, granularity="channel"), st.booleans()),
    st.just(Scheme("int", bits=4, blocksize=32, nested=True, nested_blocksize=32)),
)
int8_schemes = st.sampled_from(
    [Scheme("int", bits=8, granularity="channel"), Scheme("int", bits=8, granularity="tensor")]
)


def _check_forward(scheme, n, k, m, dtype, use_bias, lead3, seed, noncontig=False):
    qw, kw = _weight(n, k, scheme, seed)
    shape = (2, m, k) if lead3 else (m, k)
    x = _x(shape, dtype, seed, noncontig)
    bias = torch.randn(n).to(dtype) if use_bias else None
    y = quantized_linear(x, kw, bias)
    y_ref = _reference_fn(kw)(x, *kw.tensors, bias, *kw.statics)
    _assert_close(y, y_ref, _mag(x, qw.dequantize(torch.float32), bias), f"{scheme.name} N={n} K={k} M={m}")


@given(codebook_schemes, dims, widths, rows, dtypes, st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_codebook_linear_matches_reference(scheme, n, k, m, dtype, use_bias, lead3, seed):
    _check_forward(scheme, n, k, m, dtype, use_bias, lead3, seed)


@given(int4_schemes, dims, widths, rows, dtypes, st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_int4_linear_matches_reference(scheme, n, k, m, dtype, use_bias, lead3, seed):
    _check_forward(scheme, n, k, m, dtype, use_bias, lead3, seed)


@given(int8_schemes, dims, widths, rows, dtypes, st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_int8_linear_matches_reference(scheme, n, k, m, dtype, use_bias, lead3, seed):
    _check_forward(scheme, n, k, m, dtype, use_bias, lead3, seed)


@given(dims, widths, rows, dtypes, st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_w8a8_linear_matches_reference(n, k, m, dtype, use_bias, static_scale, seed):
    _, kw = _weight(n, k, Scheme("int", bits=8, granularity="channel"), seed)
    x = _x((m, k), dtype, seed)
    bias = torch.randn(n).to(dtype) if use_bias else None
    act_scale = torch.tensor([0.02]) if static_scale else None
    y = qb.w8a8_linear(x, *kw.tensors, bias, act_scale, *kw.statics)
    y_ref = reference.w8a8_linear(x, *kw.tensors, bias, act_scale, *kw.statics)
    w = kw.tensors[0].view(n, k).float() * kw.tensors[1].view(-1, 1)
    _assert_close(y, y_ref, _mag(x, w, bias), f"w8a8 N={n} K={k} M={m}")


@pytest.mark.parametrize(
    "scheme",
    [Scheme("nf4", nested=True), Scheme("int", bits=4, symmetric=False, blocksize=32),
     Scheme("int", bits=8, granularity="channel")],
    ids=lambda s: s.name,
)  # fmt: skip
@pytest.mark.parametrize("m", [1, 5, 40])
def test_large_ish_shapes_and_noncontiguous_x(scheme, m):
    # K a multiple of 128 plus a tail, N not a multiple of the row tile; x a transposed view.
    _check_forward(scheme, 67, 392, m, torch.float32, True, False, 7, noncontig=True)
    _check_forward(scheme, 67, 392, m, torch.float16, True, True, 8)


@pytest.mark.parametrize(
    "scheme",
    [Scheme("nf4", nested=True), Scheme("fp4", blocksize=32), Scheme("int", bits=4, symmetric=False, blocksize=64),
     Scheme("int", bits=4, granularity="channel"), Scheme("int", bits=8, granularity="channel")],
    ids=lambda s: s.name,
)  # fmt: skip
def test_portable_cpp_path_matches_reference(scheme, monkeypatch):
    monkeypatch.setattr(cpu, "_force_portable", True)
    for n, k, m in [(40, 256, 1), (33, 200, 3), (5, 7, 2), (24, 136, 9)]:
        _check_forward(scheme, n, k, m, torch.float32, True, False, n + k)


@pytest.mark.parametrize("blas", [True, False], ids=["sgemm", "torch-mm-loop"])
def test_large_m_panel_paths(blas, monkeypatch):
    # M above the fused limit: dequantized panels x BLAS (in C++), or the Python loop without BLAS.
    if not blas:
        monkeypatch.setattr(cpu._build, "has_blas", lambda: False)
    monkeypatch.setattr(cpu, "FUSED_MAX_M", 4)
    monkeypatch.setattr(cpu, "FUSED_MAX_M_INT8", 4)
    for scheme in (Scheme("nf4", nested=True), Scheme("int", bits=4, symmetric=False, blocksize=32),
                   Scheme("int", bits=8, granularity="channel")):  # fmt: skip
        _check_forward(scheme, 70, 264, 9, torch.float32, True, True, 4)
        qw, kw = _weight(70, 264, scheme, 4)
        g = torch.randn(2, 9, 70)
        gx = getattr(qb, ops.GRAD_INPUT_OPS[kw.op.__name__.split(".")[0]])(g, *kw.tensors, *kw.statics)
        w = qw.dequantize(torch.float32)
        _assert_close(gx, g @ w, g.abs() @ w.abs(), scheme.name)


@pytest.fixture(params=["omp", "own"])
def thread_pool(request):
    """The kernels' threads on torch's OpenMP team ("omp", where torch has one) or the own pool."""
    lib = cpu.lib()
    if lib is None:
        pytest.skip("no C++ kernels")
    from qbackend.kernels.cpu import _build

    on_omp = _build.set_omp(lib, use=request.param == "omp")
    if request.param == "omp" and not on_omp:
        pytest.skip("torch does not run on OpenMP here")
    yield request.param
    _build.set_omp(lib)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_thread_pool_survives_fork(thread_pool):
    import os

    _, kw = _weight(256, 512, Scheme("nf4", nested=True), 0)
    x = torch.randn(3, 512)
    y = quantized_linear(x, kw)  # starts the worker threads
    pid = os.fork()
    if pid == 0:  # the child has no worker threads (nor an OpenMP team): it must not deadlock
        os._exit(0 if torch.equal(quantized_linear(x, kw), y) else 1)
    _, status = os.waitpid(pid, 0)
    assert status == 0


@pytest.mark.parametrize(
    ("fmt", "compute"),
    [(f, c) for f in ("nf4", "int4", "int8") for c in ("fp32", "int8", "bf16")] + [("int8", "int16")],
)  # int16 compute has kernels for int8 weights only
def test_threads_on_the_openmp_team_give_the_own_pools_results(fmt, compute):
    # Chunks are independent of the thread that runs them: both pools must agree bit for bit.
    import ctypes

    lib = cpu.lib()
    if lib is None:
        pytest.skip("no C++ kernels")
    from qbackend.kernels.cpu import _build

    scheme = {
        "nf4": Scheme("nf4", nested=True),
        "int4": Scheme("int", bits=4, symmetric=False, granularity="block", blocksize=128),
        "int8": Scheme("int", bits=8, granularity="channel"),
    }[fmt]
    qw, _ = _weight(300, 512, scheme, 1)
    try:
        kw = prepare_weight(qw, compute=compute)
    except (ValueError, UnsupportedWeight):
        pytest.skip(f"{compute} compute does not take {fmt}")
    xs = [torch.randn(m, 512, generator=torch.Generator().manual_seed(m)) for m in (1, 5, 64, 200)]
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if not _build.set_omp(lib, use=True):
            pytest.skip("torch does not run on OpenMP here")
        stats = (ctypes.c_int64 * 2)()
        lib.qb_omp_stats(stats)
        regions = stats[0]
        on_team = [quantized_linear(x, kw) for x in xs]
        lib.qb_omp_stats(stats)
        assert stats[0] > regions, "no kernel call ran on torch's OpenMP team"
        _build.set_omp(lib, use=False)
        own = [quantized_linear(x, kw) for x in xs]
    finally:
        _build.set_omp(lib)
        torch.set_num_threads(prev)
    for x, a, b in zip(xs, on_team, own, strict=True):
        assert torch.equal(a, b), f"M={x.shape[0]}: results differ between the OpenMP team and the own pool"


def test_concurrent_callers_get_correct_results():
    # Python threads call the kernels concurrently (ctypes releases the GIL): a busy pool runs serially.
    import threading

    _, kw = _weight(512, 512, Scheme("nf4", nested=True), 0)
    xs = [torch.randn(m, 512) for m in (1, 3, 8)]
    refs = [quantized_linear(x, kw) for x in xs]
    bad: list[int] = []

    def run() -> None:
        for _ in range(30):
            bad.extend(1 for x, r in zip(xs, refs, strict=True) if not torch.equal(quantized_linear(x, kw), r))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_failed_build_falls_back_with_a_warning(tmp_path):
    # A fresh cache and a compiler that fails: the ops must still work (pure torch) and say why once.
    import os
    import subprocess

    code = (
        "import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
        "from qbackend.formats import quantize, Scheme\n"
        "from qbackend.kernels import prepare_weight, quantized_linear, cpu\n"
        "kw = prepare_weight(quantize(torch.randn(8, 64), Scheme('nf4')))\n"
        "quantized_linear(torch.randn(2, 64), kw); quantized_linear(torch.randn(2, 64), kw)\n"
        "assert cpu.lib() is None\n"
    )
    env = {**os.environ, "CXX": "false", "QBACKEND_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("C++ CPU kernels unavailable") == 1, res.stderr[-2000:]


def test_pure_torch_fallback_without_library(monkeypatch):
    monkeypatch.setattr(cpu, "lib", lambda: None)
    int8 = Scheme("int", bits=8, granularity="channel")
    for scheme in (Scheme("nf4", nested=True), Scheme("int", bits=4, symmetric=False), int8):
        _check_forward(scheme, 20, 64, 3, torch.float32, True, False, 1)
        qw, kw = _weight(20, 64, scheme, 1)
        g = torch.randn(3, 20)
        gx = getattr(qb, ops.GRAD_INPUT_OPS[kw.op.__name__.split(".")[0]])(g, *kw.tensors, *kw.statics)
        torch.testing.assert_close(gx, g @ qw.dequantize(torch.float32), rtol=1e-5, atol=1e-5)


def test_dequantization_is_exact():
    # The panel path decodes W exactly as the reference: W @ I must reproduce it bit for bit.
    for scheme in (Scheme("nf4", nested=True), Scheme("fp4", blocksize=32), Scheme("int", bits=4, symmetric=False),
                   Scheme("int", bits=4, blocksize=96), Scheme("int", bits=8, granularity="channel")):  # fmt: skip
        for n, k in [(70, 264), (9, 7)]:
            qw, kw = _weight(n, k, scheme, 3)
            eye = torch.eye(k)
            w = quantized_linear(eye, kw).t() if k > cpu.FUSED_MAX_M else None
            if w is not None:
                assert torch.equal(w, qw.dequantize(torch.float32)), scheme.name


def test_empty_batch():
    _, kw = _weight(16, 64, Scheme("nf4"), 0)
    y = quantized_linear(torch.randn(0, 64), kw)
    assert y.shape == (0, 16)
    y = quantized_linear(torch.randn(2, 0, 64), kw)
    assert y.shape == (2, 0, 16)


# ---- grad-input ops and autograd -----------------------------------------------------------------


@given(
    st.one_of(codebook_schemes, int4_schemes, int8_schemes),
    dims,
    widths,
    st.sampled_from([1, 3, 33]),
    dtypes,
    st.integers(0, 2**16),
)
def test_grad_input_matches_reference(scheme, n, k, m, dtype, seed):
    qw, kw = _weight(n, k, scheme, seed)
    name = ops.GRAD_INPUT_OPS[kw.op.__name__.split(".")[0]]
    g = _x((2, m, n), dtype, seed)
    gx = getattr(qb, name)(g, *kw.tensors, *kw.statics)
    gx_ref = getattr(reference, family_of(name).kernel + "_linear_grad_input")(g, *kw.tensors, *kw.statics)
    w = qw.dequantize(torch.float32)
    _assert_close(gx, gx_ref, g.float().abs() @ w.abs(), f"{name} {scheme.name}")


@pytest.mark.parametrize(
    "scheme",
    [Scheme("nf4", nested=True), Scheme("fp4", blocksize=32), Scheme("int", bits=4, symmetric=False, blocksize=64),
     Scheme("int", bits=4, granularity="channel"), Scheme("int", bits=8, granularity="channel")],
    ids=lambda s: s.name,
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_matches_dequantized_linear(scheme, dtype):
    qw, kw = _weight(24, 136, scheme, 5)
    w = qw.dequantize(torch.float32)
    x = _x((2, 3, 136), dtype, 5).requires_grad_()
    b = torch.randn(24, dtype=dtype, requires_grad=True)
    y = quantized_linear(x, kw, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    y2 = F.linear(x2.float(), w, b2.float()).to(dtype)
    y2.backward(gy)
    _assert_close(y.detach(), y2.detach(), _mag(x.detach(), w, b.detach()), "y")
    _assert_close(x.grad, x2.grad, gy.float().abs() @ w.abs(), "grad_x")
    _assert_close(b.grad, b2.grad, gy.float().abs().reshape(-1, 24).sum(0), "grad_bias")
    for t in kw.tensors:
        assert t is None or t.grad is None  # weights are frozen


def test_w8a8_backward_is_straight_through():
    _, kw = _weight(16, 64, Scheme("int", bits=8, granularity="channel"), 2)
    w = kw.tensors[0].view(16, 64).float() * kw.tensors[1].view(-1, 1)
    x = torch.randn(3, 64, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    y = qb.w8a8_linear(x, *kw.tensors, b, None, *kw.statics)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 16) @ w)
    torch.testing.assert_close(b.grad, torch.full((16,), 3.0))


def test_backward_saves_no_float_weight():
    # Only the quantized tensors (uint8 codes, fp32 constants, the tiny tables) may be saved.
    _, kw = _weight(256, 512, Scheme("nf4", nested=True), 0)
    x = torch.randn(4, 512, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = quantized_linear(x, kw)
    assert sum(t.numel() * t.element_size() for t in saved) < 256 * 512 * 4 / 4
    y.sum().backward()
    assert x.grad is not None


# ---- opcheck --------------------------------------------------------------------------------------


def _opcheck_cases():
    cases = []
    for scheme, n, k in [
        (Scheme("nf4", blocksize=32), 32, 64),
        (Scheme("fp4", blocksize=64, nested=True, nested_blocksize=32), 24, 40),  # blocks straddle rows
        (Scheme("int", bits=4, symmetric=True, blocksize=16), 16, 48),
        (Scheme("int", bits=4, symmetric=False, blocksize=32), 12, 136),
        (Scheme("int", bits=8, granularity="channel"), 20, 72),
    ]:
        cases.append(pytest.param(scheme, n, k, id=f"{scheme.name}-{n}x{k}"))
    return cases


@pytest.mark.parametrize("scheme,n,k", _opcheck_cases())
def test_opcheck_forward_and_grad_input(scheme, n, k):
    _, kw = _weight(n, k, scheme, 0)
    name = kw.op.__name__.split(".")[0]
    for shape in [(1, k), (3, 5, k)]:
        x = torch.randn(*shape, requires_grad=True)
        bias = torch.randn(n, requires_grad=True)
        torch.library.opcheck(kw.op, (x, *kw.tensors, bias, *kw.statics))
        torch.library.opcheck(kw.op, (x.detach(), *kw.tensors, None, *kw.statics))
        g = torch.randn(*shape[:-1], n)
        torch.library.opcheck(getattr(qb, ops.GRAD_INPUT_OPS[name]).default, (g, *kw.tensors, *kw.statics))


def test_opcheck_w8a8():
    _, kw = _weight(20, 72, Scheme("int", bits=8, granularity="channel"), 0)
    for shape, act_scale in [((1, 72), None), ((2, 3, 72), torch.tensor([0.05]))]:
        x = torch.randn(*shape, requires_grad=True)
        torch.library.opcheck(qb.w8a8_linear.default, (x, *kw.tensors, torch.randn(20), act_scale, *kw.statics))


def test_compiles_fullgraph_with_dynamic_batch():
    _, kw = _weight(24, 136, Scheme("nf4", nested=True), 0)
    bias = torch.randn(24)
    f = torch.compile(lambda x: quantized_linear(x, kw, bias).relu(), backend="aot_eager", fullgraph=True, dynamic=True)
    for m in (3, 7):
        x = torch.randn(m, 136)
        torch.testing.assert_close(f(x), quantized_linear(x, kw, bias).relu())


# ---- errors ---------------------------------------------------------------------------------------


def _cb4_args(n=8, k=64):
    _, kw = _weight(n, k, Scheme("nf4", blocksize=32, nested=True), 0)
    return list(kw.tensors), list(kw.statics)


def test_error_x_width():
    t, s = _cb4_args()
    with pytest.raises(ValueError, match=r"x has last dimension 63 but in_features=64"):
        qb.nf4_linear(torch.randn(2, 63), *t, None, *s)


def test_error_codes_dtype():
    t, s = _cb4_args()
    t[0] = t[0].to(torch.int8)
    with pytest.raises(TypeError, match=r"codes must be uint8; got torch.int8"):
        qb.nf4_linear(torch.randn(2, 64), *t, None, *s)


def test_error_x_dtype_and_constants():
    t, s = _cb4_args()
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16"):
        qb.nf4_linear(torch.ones(2, 64, dtype=torch.int32), *t, None, *s)
    t2 = list(t)
    t2[1] = torch.ones(16)  # both plain and nested constants
    with pytest.raises(ValueError, match=r"either absmax .* or the nested_\* tensors, not both"):
        qb.nf4_linear(torch.randn(2, 64), *t2, None, *s)
    t3 = list(t)
    t3[3] = None
    with pytest.raises(ValueError, match=r"nested_absmax is None"):
        qb.nf4_linear(torch.randn(2, 64), *t3, None, *s)
    with pytest.raises(ValueError, match=r"bias has 7 elements; expected 8"):
        qb.nf4_linear(torch.randn(2, 64), *t, torch.randn(7), *s)


def test_error_int_formats():
    _, kw = _weight(8, 64, Scheme("int", bits=4, symmetric=False, blocksize=32), 0)
    codes, scale, zp = kw.tensors
    with pytest.raises(ValueError, match=r"scale has 8 elements; expected 16"):
        qb.int4_linear(torch.randn(2, 64), codes, scale[:, :1].contiguous(), zp, None, *kw.statics)
    with pytest.raises(TypeError, match=r"zero_point must be uint8"):
        qb.int4_linear(torch.randn(2, 64), codes, scale, zp.float(), None, *kw.statics)
    _, kw8 = _weight(8, 64, Scheme("int", bits=8, granularity="channel"), 0)
    with pytest.raises(TypeError, match=r"codes must be int8; got torch.uint8"):
        qb.int8_linear(torch.randn(2, 64), kw8.tensors[0].view(torch.uint8), kw8.tensors[1], None, 8, 64)
    with pytest.raises(ValueError, match=r"grad_y has last dimension 5 but out_features=8"):
        qb.int8_linear_grad_input(torch.randn(2, 5), *kw8.tensors, 8, 64)


def test_error_device_mismatch():
    t, s = _cb4_args()
    t[0] = t[0].to("meta")
    with pytest.raises(ValueError, match=r"codes is on meta but x is on cpu"):
        qb.nf4_linear(torch.randn(2, 64), *t, None, *s)


def test_errors_surface_at_trace_time():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t, s = _cb4_args()
    with FakeTensorMode() as mode:
        ft = [None if a is None else mode.from_tensor(a) for a in t]
        with pytest.raises(ValueError, match=r"in_features=64"):
            qb.nf4_linear(torch.randn(2, 65), *ft, None, *s)
        assert qb.nf4_linear(torch.randn(2, 3, 64), *ft, None, *s).shape == (2, 3, 8)


# ---- API ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme,op",
    [
        (Scheme("nf4", nested=True), "nf4_linear"),
        (Scheme("fp4", blocksize=256), "fp4_linear"),
        (Scheme("int", bits=4, blocksize=64), "int4_linear"),
        (Scheme("int", bits=4, symmetric=False, blocksize=128), "int4_linear"),
        (Scheme("int", bits=4, granularity="channel"), "int4_linear"),
        (Scheme("int", bits=4, symmetric=False, granularity="tensor"), "int4_linear"),
        (Scheme("int", bits=4, blocksize=64, nested=True), "int4_linear"),
        (Scheme("int", bits=8, granularity="channel"), "int8_linear"),
        (Scheme("int", bits=8, granularity="tensor"), "int8_linear"),
    ],
    ids=lambda v: v.name if isinstance(v, Scheme) else v,
)
def test_prepare_weight_supported(scheme, op):
    assert supported(scheme)[0]
    qw, kw = _weight(20, 136, scheme, 0)
    assert kw.op is getattr(qb, op).default
    assert len(kw.names) == len(kw.tensors) and kw.out_features == 20 and kw.in_features == 136
    x = torch.randn(3, 136)
    torch.testing.assert_close(quantized_linear(x, kw), F.linear(x, qw.dequantize(torch.float32)), rtol=1e-5, atol=1e-4)
    assert kw.nbytes() > 0


@pytest.mark.parametrize(
    "scheme,why",
    [
        (Scheme("int", bits=8, symmetric=False, granularity="channel"), "affine"),
        (Scheme("int", bits=8, granularity="block", blocksize=64), "groups"),
        (Scheme("int", bits=8, granularity="channel", axis=1), "axis 0"),
        (Scheme("int", bits=4, granularity="channel", axis=1), "axis 1"),
    ],
    ids=lambda v: v.name if isinstance(v, Scheme) else v,
)
def test_prepare_weight_unsupported(scheme, why):
    ok, reason = supported(scheme)
    assert not ok and why in reason
    qw = quantize(torch.randn(8, 64), scheme)
    with pytest.raises(UnsupportedWeight, match=why) as e:
        prepare_weight(qw)
    assert e.value.reason == reason


def test_prepare_weight_rejects_non_2d():
    with pytest.raises(UnsupportedWeight, match="2-D"):
        prepare_weight(quantize(torch.randn(4, 8, 64), Scheme("nf4")))


def test_cuda_impl_falls_back_to_reference_with_one_warning(monkeypatch):
    cuda.impl.cache_clear()
    monkeypatch.setitem(sys.modules, "qbackend.kernels.triton", None)  # import fails
    # `from . import triton` reads the package attribute first when an earlier test imported it.
    monkeypatch.delattr(sys.modules["qbackend.kernels"], "triton", raising=False)
    try:
        with pytest.warns(RuntimeWarning, match="no Triton kernel for int8_linear"):
            fn = cuda.impl("int8_linear")
        assert fn is reference.int8_linear
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cuda.impl("int8_linear") is fn  # cached: warned once
    finally:
        cuda.impl.cache_clear()
