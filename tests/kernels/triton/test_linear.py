"""Triton kernels (qbackend.kernels.triton) against the reference ops (qbackend.kernels.reference).

Without CUDA every kernel runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 is set
here before anything imports triton; the kernels also load an interpreted copy of themselves if
triton was imported earlier without it). With CUDA the same tests run the compiled GPU path, and the
``gpu`` group adds bf16, larger shapes, autotuning and CUDA graphs.

Shapes are tiny on purpose (the interpreter is slow); tile sizes under the interpreter are 32, so
N, K = 33..96 cover partial tiles, several K splits and straddling/odd-K blocks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` in this process
else:
    # Heuristic configs for the correctness grid (tuning compiles ~12 configs per shape); the
    # autotuner has its own GPU test below.
    os.environ.setdefault("QBACKEND_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qbackend.formats import Scheme, quantize  # noqa: E402
from qbackend.formats.codebooks import code_table  # noqa: E402
from qbackend.kernels import reference as R  # noqa: E402
from qbackend.kernels import triton as T  # noqa: E402
from qbackend.kernels.triton import autotune as at  # noqa: E402
from qbackend.kernels.triton import linear as L  # noqa: E402

DEVICE = torch.device("cuda" if _CUDA else "cpu")
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
gpu = pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Same shape/dtype, finite, and max error within fp32-reordering (or 16-bit rounding) of max |ref|."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == (dtype or ref.dtype), (out.dtype, ref.dtype)
    o, r = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(o).all()
    scale = max(r.abs().max().item(), 1e-6)
    err = (o - r).abs().max().item() / scale
    assert err <= TOL[out.dtype], f"relative max error {err:.3g} > {TOL[out.dtype]}"


def _x(lead: tuple[int, ...], k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, k, generator=g).to(dtype).to(DEVICE)


def _codebook(n: int, k: int, kind: str, bs: int, nested: bool, seed: int = 0) -> tuple:
    """(codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table) on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    qw = quantize(torch.randn(n, k, generator=g), Scheme(kind, blocksize=bs, nested=nested, nested_blocksize=32))
    qw = qw.to(DEVICE)
    nc = qw.nested
    return (
        qw.codes, qw.scale, nc.codes if nc else None, nc.absmax2 if nc else None, nc.offset if nc else None,
        code_table(kind, DEVICE), code_table("dynamic", DEVICE) if nc else None,
    )  # fmt: skip


def _int4(n: int, k: int, g: int, sym: bool, seed: int = 0) -> tuple:
    """(codes, scale [N, G], zero_point [N, G] or None). Scheme wants even groups; odd ones (which
    the op contract allows, e.g. one group of an odd K) get random operands instead."""
    gen = torch.Generator().manual_seed(seed)
    if g % 2:
        groups = -(-k // g)
        codes = torch.randint(0, 256, ((n * k + 1) // 2,), generator=gen, dtype=torch.uint8)
        scale = torch.rand(n, groups, generator=gen) + 0.05
        zp = None if sym else torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.uint8)
        return codes.to(DEVICE), scale.to(DEVICE), None if zp is None else zp.to(DEVICE)
    qw = quantize(torch.randn(n, k, generator=gen), Scheme("int", bits=4, symmetric=sym, blocksize=g)).to(DEVICE)
    return qw.codes, qw.scale, qw.zero_point


def _int8(n: int, k: int, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    qw = quantize(torch.randn(n, k, generator=gen), Scheme("int", bits=8, granularity="channel")).to(DEVICE)
    return qw.codes, qw.scale


def _bias(n: int, on: bool, seed: int = 7) -> torch.Tensor | None:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(DEVICE) if on else None


# (N, K, blocksize, kind, nested): K % bs == 0 (aligned fast path), straddling blocks with even K,
# odd K (generic flat-index path), K == bs with N not a tile multiple.
CODEBOOK_CASES = [
    (40, 64, 32, "nf4", True),
    (33, 96, 64, "fp4", True),
    (24, 75, 32, "nf4", False),
    (17, 64, 64, "fp4", False),
]
MS = [1, 3, 17, 80]  # GEMV, small-M split-K dot, small-M with BLOCK_M 32, large-M tiled GEMM


# ---------------------------------------------------------------------------------------------
# NF4 / FP4
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("case", CODEBOOK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_codebook_linear(case: tuple, m: int, dtype: torch.dtype) -> None:
    n, k, bs, kind, nested = case
    w = _codebook(n, k, kind, bs, nested)
    x = _x((m,), k, dtype, seed=m)
    b = _bias(n, on=(m + n) % 2 == 0)
    args = (*w, b, n, k, bs, 32)
    _check(T.codebook_linear(x, *args), R.codebook_linear(x, *args))


@pytest.mark.parametrize("m", [1, 17, 80])
@pytest.mark.parametrize("case", CODEBOOK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_codebook_grad_input(case: tuple, m: int) -> None:
    n, k, bs, kind, nested = case
    w = _codebook(n, k, kind, bs, nested)
    gy = _x((m,), n, torch.float32, seed=m + 1)
    ref = gy.float() @ R.decode_codebook(*w, n, k, bs, 32)
    _check(T.codebook_linear_grad_input(gy, *w, n, k, bs, 32), ref)


def test_codebook_grad_input_fp16_3d() -> None:
    n, k, bs = 33, 96, 64
    w = _codebook(n, k, "nf4", bs, True)
    gy = _x((2, 5), n, torch.float16, seed=3)
    ref = (gy.float() @ R.decode_codebook(*w, n, k, bs, 32)).half()
    _check(T.codebook_linear_grad_input(gy, *w, n, k, bs, 32), ref)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 64),
    k=st.integers(1, 80),
    m=st.integers(1, 20),
    bs=st.sampled_from([32, 64]),
    kind=st.sampled_from(["nf4", "fp4"]),
    nested=st.booleans(),
    bias=st.booleans(),
)
def test_codebook_linear_hypothesis(n: int, k: int, m: int, bs: int, kind: str, nested: bool, bias: bool) -> None:
    w = _codebook(n, k, kind, bs, nested, seed=n * 1000 + k)
    x = _x((m,), k, torch.float32, seed=m)
    args = (*w, _bias(n, bias), n, k, bs, 32)
    _check(T.codebook_linear(x, *args), R.codebook_linear(x, *args))


# ---------------------------------------------------------------------------------------------
# INT4 (groups along K; symmetric: zero point 8)
# ---------------------------------------------------------------------------------------------

# (N, K, groupsize, symmetric): aligned groups; group not a power of two (per-pair constant
# gather); odd K (per-element nibbles, constants once per tile); a shorter tail group (70 % 64) on
# the aligned path; an odd group size with even K (pairs could straddle groups: per-element path).
INT4_CASES = [(40, 64, 32, True), (33, 96, 48, False), (24, 75, 32, False), (20, 70, 64, True), (9, 74, 37, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("case", INT4_CASES, ids=lambda c: "-".join(map(str, c)))
def test_int4_linear(case: tuple, m: int, dtype: torch.dtype) -> None:
    n, k, g, sym = case
    codes, scale, zp = _int4(n, k, g, sym)
    x = _x((m,), k, dtype, seed=m)
    args = (codes, scale, zp, _bias(n, on=m % 2 == 1), n, k, g)
    _check(T.int4_linear(x, *args), R.int4_linear(x, *args))


@pytest.mark.parametrize("m", [1, 80])
@pytest.mark.parametrize("case", INT4_CASES, ids=lambda c: "-".join(map(str, c)))
def test_int4_grad_input(case: tuple, m: int) -> None:
    n, k, g, sym = case
    codes, scale, zp = _int4(n, k, g, sym)
    gy = _x((m,), n, torch.float32, seed=m)
    ref = gy @ R.decode_int4(codes, scale, zp, n, k, g)
    _check(T.int4_linear_grad_input(gy, codes, scale, zp, n, k, g), ref)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 48),
    k=st.integers(1, 80),
    m=st.integers(1, 20),
    g=st.sampled_from([1, 2, 5, 16, 32, 48, 64]),
    sym=st.booleans(),
)
def test_int4_linear_hypothesis(n: int, k: int, m: int, g: int, sym: bool) -> None:
    codes, scale, zp = _int4(n, k, g, sym, seed=n + k)
    x = _x((m,), k, torch.float32, seed=m)
    args = (codes, scale, zp, _bias(n, True), n, k, g)
    _check(T.int4_linear(x, *args), R.int4_linear(x, *args))


# ---------------------------------------------------------------------------------------------
# INT8 per channel
# ---------------------------------------------------------------------------------------------

INT8_CASES = [(40, 64), (33, 75)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: "-".join(map(str, c)))
def test_int8_linear(case: tuple, m: int, dtype: torch.dtype) -> None:
    n, k = case
    codes, scale = _int8(n, k)
    x = _x((m,), k, dtype, seed=m)
    args = (codes, scale, _bias(n, on=m != 3), n, k)
    _check(T.int8_linear(x, *args), R.int8_linear(x, *args))


@pytest.mark.parametrize("m", [1, 80])
@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: "-".join(map(str, c)))
def test_int8_grad_input(case: tuple, m: int) -> None:
    n, k = case
    codes, scale = _int8(n, k)
    gy = _x((m,), n, torch.float32, seed=m)
    ref = gy @ (codes.view(n, k).float() * scale.view(-1, 1))
    _check(T.int8_linear_grad_input(gy, codes, scale, n, k), ref)


# ---------------------------------------------------------------------------------------------
# W8A8
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("case", [(40, 64), (33, 75)], ids=lambda c: "-".join(map(str, c)))
def test_w8a8_linear(case: tuple, m: int, static: bool) -> None:
    n, k = case
    codes, scale = _int8(n, k)
    dtype = torch.float16 if m == 17 else torch.float32
    x = _x((m,), k, dtype, seed=m)
    act = torch.tensor(0.03, device=DEVICE) if static else None
    args = (codes, scale, _bias(n, on=m != 1), act, n, k)
    _check(T.w8a8_linear(x, *args), R.w8a8_linear(x, *args))


def test_quantize_activations_bit_exact() -> None:
    """Codes and scales equal the reference's (IEEE division, ties to even), incl. exact .5 ties."""
    x = _x((5,), 67, torch.float32, seed=1)
    x[0, :4] = torch.tensor([1.27, -1.27, 0.5 * 1.27 / 127 * 5, 0.0])  # amax 1.27 -> s 0.01; ties at k+0.5
    x[1] = 0.0  # all-zero token: scale 0, codes 0
    xq, sx = T.quantize_activations(x)
    s_ref = x.abs().amax(dim=1) / 127.0
    safe = torch.where(s_ref > 0, s_ref, torch.ones_like(s_ref))
    q_ref = torch.clamp(torch.round(x / safe[:, None]), -127, 127).to(torch.int8)
    assert torch.equal(sx.cpu(), s_ref.cpu())
    assert torch.equal(xq.cpu(), q_ref.cpu())


# ---------------------------------------------------------------------------------------------
# shapes, paths, errors
# ---------------------------------------------------------------------------------------------


def test_3d_inputs_and_bias_all_ops() -> None:
    n, k = 33, 64
    x = _x((2, 3), k, torch.float32, seed=11)
    b = _bias(n, True)
    w = _codebook(n, k, "nf4", 32, True)
    _check(T.codebook_linear(x, *w, b, n, k, 32, 32), R.codebook_linear(x, *w, b, n, k, 32, 32))
    c4, s4, z4 = _int4(n, k, 32, False)
    _check(T.int4_linear(x, c4, s4, z4, b, n, k, 32), R.int4_linear(x, c4, s4, z4, b, n, k, 32))
    c8, s8 = _int8(n, k)
    _check(T.int8_linear(x, c8, s8, b, n, k), R.int8_linear(x, c8, s8, b, n, k))
    _check(T.w8a8_linear(x, c8, s8, b, None, n, k), R.w8a8_linear(x, c8, s8, b, None, n, k))
    # A per-tensor int8 scale (one element) broadcasts, as in the reference.
    st = s8.max().reshape(1)
    _check(T.int8_linear(x, c8, st, b, n, k), R.int8_linear(x, c8, st, b, n, k))
    _check(T.w8a8_linear(x, c8, st, b, None, n, k), R.w8a8_linear(x, c8, st, b, None, n, k))
    # A non-contiguous input (every other token) goes through the same kernels.
    xs = _x((6,), k, torch.float32, seed=12)[::2]
    _check(T.int8_linear(xs, c8, s8, b, n, k), R.int8_linear(xs, c8, s8, b, n, k))


@pytest.mark.parametrize(
    "variant,cfg,m",
    [
        (at.GEMV, at.KernelConfig(block_m=1, block_n=16, block_k=16, split=1), 1),  # direct store, no atomics
        (at.GEMV, at.KernelConfig(block_m=1, block_n=32, block_k=64, split=4), 1),  # BK > bs: per-pair constants
        (at.WO_SMALL, at.KernelConfig(block_m=16, block_n=16, block_k=32, split=1, group_m=1), 5),
        (at.WO_LARGE, at.KernelConfig(block_m=16, block_n=32, block_k=32, split=3, group_m=3), 70),  # atomics
    ],
    ids=["gemv-nosplit", "gemv-bk64", "small-nosplit", "large-split"],
)
def test_config_paths(variant: str, cfg: at.KernelConfig, m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Specialisations the fixed interpreter configs do not reach (split 1, BK > block size, ...)."""
    monkeypatch.setattr(L, "WIDE_GEMV", False)  # these configs are the previous small-M kernels'
    n, k, bs = 40, 64, 32
    w = _codebook(n, k, "nf4", bs, nested=variant != at.WO_LARGE)  # nested NF4 decodes first at large M
    x = _x((m,), k, torch.float16, seed=m)
    args = (*w, _bias(n, True), n, k, bs, 32)
    with at.override_config(variant, cfg):
        _check(T.codebook_linear(x, *args), R.codebook_linear(x, *args))


def test_grad_config_paths() -> None:
    n, k, g = 40, 64, 32
    codes, scale, zp = _int4(n, k, g, True)
    gy = _x((3,), n, torch.float16, seed=2)
    ref = (gy.float() @ R.decode_int4(codes, scale, zp, n, k, g)).half()
    with at.override_config(at.GRAD_SMALL, at.KernelConfig(block_m=16, block_n=16, block_k=64, split=1)):
        _check(T.int4_linear_grad_input(gy, codes, scale, zp, n, k, g), ref)


# ---------------------------------------------------------------------------------------------
# wide GEMV (M <= 4): K tiles over several constant blocks, table gathered or selected in registers
# ---------------------------------------------------------------------------------------------

WIDE_DTYPES = DTYPES + ([torch.bfloat16] if _CUDA else [])  # the interpreter computes bf16 wrongly


def _wide_operands(fmt: str, n: int, k: int, bs: int, nested: bool, seed: int) -> tuple[Callable, Callable]:
    """(kernel call, reference call), each taking (x, bias), for one weight-only format."""
    if fmt in ("nf4", "fp4"):
        w = _codebook(n, k, fmt, bs, nested, seed=seed)
        return (
            lambda x, b: T.codebook_linear(x, *w, b, n, k, bs, 32),
            lambda x, b: R.codebook_linear(x, *w, b, n, k, bs, 32),
        )
    if fmt == "int4":
        c, s_, zp = _int4(n, k, bs, sym=not nested, seed=seed)  # ``nested`` picks the zero-point variant
        return (
            lambda x, b: T.int4_linear(x, c, s_, zp, b, n, k, bs),
            lambda x, b: R.int4_linear(x, c, s_, zp, b, n, k, bs),
        )
    c, s_ = _int8(n, k, seed=seed)
    return lambda x, b: T.int8_linear(x, c, s_, b, n, k), lambda x, b: R.int8_linear(x, c, s_, b, n, k)


@settings(max_examples=25 if _CUDA else 80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    fmt=st.sampled_from(["nf4", "fp4", "int4", "int8"]),
    n=st.integers(1, 40),
    kb=st.integers(1, 5),
    k_extra=st.sampled_from([0, 0, 2, 6, 1]),
    m=st.integers(1, 4),
    bs=st.sampled_from([2, 4, 16, 32, 64]),
    nested=st.booleans(),
    lut=st.sampled_from(["pairs", "global", "select", "gather"]),
    prefetch=st.booleans(),
    bias=st.booleans(),
    block_n=st.sampled_from([8, 16, 32]),
    block_k=st.sampled_from([16, 32, 64, 128]),
    split=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from(WIDE_DTYPES),
)
def test_wide_gemv_hypothesis(
    fmt: str, n: int, kb: int, k_extra: int, m: int, bs: int, nested: bool, lut: str, prefetch: bool, bias: bool,
    block_n: int, block_k: int, split: int, dtype: torch.dtype,
) -> None:  # fmt: skip
    """Against the reference for K = several blocks (+ a partial block, odd K), N not dividing BLOCK_N,
    BLOCK_K below, at and above the block size, 1-3 K splits; the wide kernel must run where eligible."""
    if fmt in ("nf4", "fp4") and bs < 32:
        bs = 32 if bs == 16 else 64  # the quantizer's smallest codebook blocks; the small ones are int4 groups
    k = kb * bs + k_extra
    call, ref = _wide_operands(fmt, n, k, bs, nested, seed=n * 100 + k)
    x = _x((m,), k, dtype, seed=m + k)
    b = _bias(n, bias)
    launched: list[int] = []
    orig = L._launch_wo_wide

    def spy(*a, **kw):  # noqa: ANN002, ANN003 - passes through
        launched.append(1)
        return orig(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(L, "_NESTED_DECODE_M", at.WIDE_M_MAX + 1)  # nested M >= 3 may decode first instead
        mp.setattr(L, "WIDE_ROWS", dict.fromkeys(L.WIDE_ROWS, at.WIDE_M_MAX))  # every layout, M = 1..4
        mp.setattr(L, "_launch_wo_wide", spy)
        mp.setattr(L, "LUT", lut)
        mp.setattr(L, "PREFETCH", prefetch)
        cfg = at.KernelConfig(block_m=4, block_n=block_n, block_k=block_k, split=split)
        with at.override_config(at.GEMV_WIDE, cfg):
            out = call(x, b)
    _check(out, ref(x, b))
    eligible = fmt == "int8" or (k % 2 == 0 and (fmt == "int4" or k % bs == 0))
    assert bool(launched) == eligible, (fmt, k, bs)


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
def test_wide_gemv_switch_and_nonfinite(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """WIDE_GEMV / LUT / PREFETCH give the same results as the previous kernels; NaN and Inf in x spread
    to the outputs as in the reference."""
    n, k, bs = 37, 192, 64
    monkeypatch.setattr(L, "_NESTED_DECODE_M", at.WIDE_M_MAX + 1)  # M = 3 reaches the small-M kernels
    monkeypatch.setattr(L, "WIDE_ROWS", dict.fromkeys(L.WIDE_ROWS, at.WIDE_M_MAX))
    call, ref = _wide_operands(fmt, n, k, bs, True, seed=5)
    x = _x((3,), k, torch.float32, seed=4)
    b = _bias(n, True)
    outs = []
    paths = [(False, "pairs", True), (True, "pairs", True), (True, "pairs", False), (True, "global", True),
             (True, "select", True), (True, "gather", True)]  # fmt: skip
    for wide, lut, prefetch in paths:
        monkeypatch.setattr(L, "WIDE_GEMV", wide)
        monkeypatch.setattr(L, "LUT", lut)
        monkeypatch.setattr(L, "PREFETCH", prefetch)
        outs.append(call(x[:1], b))
        _check(outs[-1], ref(x[:1], b))
        _check(call(x, b), ref(x, b))
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    out, r = call(x, b).cpu(), ref(x, b).cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(r)) and torch.equal(torch.isinf(out), torch.isinf(r))
    assert torch.isfinite(out[0]).all()
    monkeypatch.setattr(L, "WIDE_GEMV", True)
    monkeypatch.setattr(L, "LUT", "shared")
    with pytest.raises(ValueError, match=r"linear\.LUT is 'shared'; expected one of \['gather', 'global'"):
        call(x[:1], b)


def test_pair_table_cache() -> None:
    """One pair table per table tensor and version; an entry dies with its table."""
    import gc

    t = code_table("nf4", DEVICE)
    a = L._pair_table(t)
    assert a is L._pair_table(t) and a.shape == (256, 2) and a.dtype == torch.float32
    assert torch.equal(a[0x7F], torch.stack([t[7], t[15]])) and torch.equal(a[0xA0], torch.stack([t[10], t[0]]))
    u = t.clone()
    assert torch.equal(L._pair_table(u), a)
    u.mul_(2)  # in-place change: a new version, a new pair table
    assert torch.equal(L._pair_table(u), 2 * a)
    n = len(L._pair_tables)
    del u
    gc.collect()
    assert len(L._pair_tables) == n - 1
    with torch.inference_mode():  # no version counter on inference tensors
        v = t.clone()
    assert torch.equal(L._pair_table(v), a)


def test_wide_gemv_configs() -> None:
    for per_byte in (1, 2):
        for m in (1, 2, 3, 4):
            for n, k in ((8192, 8192), (4096, 14336), (64, 96)):
                cfgs = [at.heuristic_config(at.GEMV_WIDE, m, n, k, per_byte, 132)]
                cfgs += at.candidate_configs(at.GEMV_WIDE, m, n, k, per_byte, 132)
                assert 1 < len(cfgs) <= 13
                for c in cfgs:
                    assert c.block_m == at.wide_block_m(m) and c.block_m >= m and c.split >= 1
                    assert c.block_k & (c.block_k - 1) == 0 and 16 <= c.block_k <= 1024
                    assert c.block_n & (c.block_n - 1) == 0 and c.num_warps in (2, 4, 8)
    # 8192^2 at M=1 on 132 SMs: about four programs per SM.
    c = at.heuristic_config(at.GEMV_WIDE, 1, 8192, 8192, 2, 132)
    assert 2 * 132 <= (8192 // c.block_n) * c.split <= 8 * 132


# ---------------------------------------------------------------------------------------------
# wide-K tl.dot (codebook, small M): K tiles over several constant blocks
# ---------------------------------------------------------------------------------------------


@settings(max_examples=10 if _CUDA else 60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    kind=st.sampled_from(["nf4", "fp4"]),
    nested=st.booleans(),
    n=st.integers(1, 40),
    kb=st.integers(1, 5),
    k_extra=st.sampled_from([0, 0, 0, 2, 1]),
    m=st.integers(1, 70),
    bs=st.sampled_from([32, 64]),
    lut=st.sampled_from(["global", "pairs", "select"]),
    prefetch=st.booleans(),
    bias=st.booleans(),
    block_n=st.sampled_from([16, 32]),
    block_k=st.sampled_from([32, 64, 128, 256]),
    split=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from(WIDE_DTYPES),
)
def test_wide_dot_hypothesis(
    kind: str, nested: bool, n: int, kb: int, k_extra: int, m: int, bs: int, lut: str, prefetch: bool, bias: bool,
    block_n: int, block_k: int, split: int, dtype: torch.dtype,
) -> None:  # fmt: skip
    """Against the reference for K = several blocks (a partial or odd K falls back to the other paths),
    K not a multiple of BLOCK_K, N not dividing BLOCK_N, M = 1..70 (two row tiles), 1-3 K splits; the
    wide dot must run exactly where eligible."""
    k = kb * bs + k_extra
    call, ref = _wide_operands(kind, n, k, bs, nested, seed=n * 100 + k)
    x = _x((m,), k, dtype, seed=m + k)
    b = _bias(n, bias)
    launched: list[int] = []
    orig = L._launch_wo_dot_wide

    def spy(*a, **kw):  # noqa: ANN002, ANN003 - passes through
        launched.append(1)
        return orig(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(L, "WIDE_DOT_ROWS", {L.CODEBOOK: 70})
        mp.setattr(L, "WIDE_DOT_PLAIN", True)  # plain NF4/FP4 too
        mp.setattr(L, "WIDE_GEMV", False)  # M = 1, 2 reach the wide dot too
        mp.setattr(L, "_launch_wo_dot_wide", spy)
        mp.setattr(L, "LUT", lut)
        mp.setattr(L, "PREFETCH", prefetch)
        cfg = at.KernelConfig(block_m=at.block_m_for(m), block_n=block_n, block_k=block_k, split=split, group_m=2)
        with at.override_config(at.DOT_WIDE, cfg):
            out = call(x, b)
    _check(out, ref(x, b))
    assert bool(launched) == (k % bs == 0), (k, bs)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
def test_wide_dot_routing_and_nonfinite(monkeypatch: pytest.MonkeyPatch) -> None:
    """WIDE_DOT_ROWS (8 by default) takes nested M = 3..rows from decode-first, leaves the wide GEMV its
    rows and larger M to decoding; NaN and Inf in x spread as in the reference."""
    n, k, bs = 37, 192, 64
    call, ref = _wide_operands("nf4", n, k, bs, True, seed=5)
    x = _x((66,), k, torch.float32, seed=4)
    b = _bias(n, True)
    paths: list[str] = []
    for name in ("_launch_wo_dot_wide", "_launch_wo_wide", "_decoded"):
        real = getattr(L, name)
        monkeypatch.setattr(L, name, lambda *a, _r=real, _n=name, **kw: paths.append(_n) or _r(*a, **kw))
    assert L.WIDE_DOT_ROWS[L.CODEBOOK] == L._env_rows("QBACKEND_WIDE_DOT_ROWS", 8)
    monkeypatch.setattr(L, "WIDE_DOT_ROWS", {L.CODEBOOK: 0})
    _check(call(x[:3], b), ref(x[:3], b))
    assert paths == ["_decoded"]
    monkeypatch.setattr(L, "WIDE_DOT_ROWS", {L.CODEBOOK: 64})
    for rows, want in ((1, "_launch_wo_wide"), (3, "_launch_wo_dot_wide"), (64, "_launch_wo_dot_wide"),
                       (65, "_decoded")):  # fmt: skip
        paths.clear()
        _check(call(x[:rows], b), ref(x[:rows], b))
        assert paths == [want], (rows, paths)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    out, r = call(x[:4], b).cpu(), ref(x[:4], b).cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(r)) and torch.equal(torch.isinf(out), torch.isinf(r))
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()
    monkeypatch.setenv("QBACKEND_WIDE_DOT_ROWS", "32")
    assert L._env_rows("QBACKEND_WIDE_DOT_ROWS", 8) == 32
    monkeypatch.delenv("QBACKEND_WIDE_DOT_ROWS")
    assert L._env_rows("QBACKEND_WIDE_DOT_ROWS", 8) == 8
    monkeypatch.setenv("QBACKEND_WIDE_DOT_ROWS", "many")
    with pytest.raises(ValueError, match="QBACKEND_WIDE_DOT_ROWS"):
        L._env_rows("QBACKEND_WIDE_DOT_ROWS")


def test_wide_dot_configs() -> None:
    for m in (2, 3, 16, 17, 64):
        for n, k in ((4096, 4096), (8192, 8192), (28672, 8192), (8192, 28672), (40, 96)):
            cfgs = [at.heuristic_config(at.DOT_WIDE, m, n, k, 0, 132)]
            cfgs += at.candidate_configs(at.DOT_WIDE, m, n, k, 0, 132)
            assert 1 < len(cfgs) <= 13
            for c in cfgs:
                assert c.block_m == at.block_m_for(m) and c.block_m >= min(m, 64) and c.split >= 1
                assert c.block_k & (c.block_k - 1) == 0 and 32 <= c.block_k <= 512
                assert c.block_n & (c.block_n - 1) == 0 and 16 <= c.block_n and c.num_warps in (4, 8)
    # Big shapes: the heuristic grid has about two programs per SM or more (split-K where N is small).
    for n, k in ((4096, 4096), (8192, 8192), (8192, 28672)):
        c = at.heuristic_config(at.DOT_WIDE, 16, n, k, 0, 132)
        assert c.block_k >= 256 and 2 * 132 <= (n // c.block_n) * c.split <= 8 * 132


def test_empty_input() -> None:
    n, k = 8, 64
    c8, s8 = _int8(n, k)
    x = torch.empty(0, k, device=DEVICE)
    assert T.int8_linear(x, c8, s8, None, n, k).shape == (0, n)
    assert T.w8a8_linear(x, c8, s8, None, None, n, k).shape == (0, n)
    assert T.int8_linear_grad_input(torch.empty(0, n, device=DEVICE), c8, s8, n, k).shape == (0, k)


def test_bad_operands_raise() -> None:
    n, k = 8, 64
    w = _codebook(n, k, "nf4", 32, False)
    with pytest.raises(ValueError, match="expected"):
        T.codebook_linear(_x((2,), k + 1, torch.float32, 0), *w, None, n, k, 32, 256)
    with pytest.raises(ValueError, match="codes"):
        T.codebook_linear(_x((2,), k, torch.float32, 0), *w, None, n + 1, k, 32, 256)
    c8, s8 = _int8(n, k)
    with pytest.raises(ValueError, match="scale"):
        T.int8_linear(_x((2,), k, torch.float32, 0), c8, s8[:-1], None, n, k)
    with pytest.raises(ValueError, match="on "):  # operands on another device than the input
        T.int8_linear(_x((2,), k, torch.float32, 0), c8.to("meta"), s8, None, n, k)


def test_cpu_tensors_use_an_interpreted_copy() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    from qbackend.kernels.triton._runtime import kernels_for

    mod, interpreted = kernels_for(torch.device("cpu"))
    assert interpreted and isinstance(mod.wo_gemv_kernel, InterpretedFunction)


# ---------------------------------------------------------------------------------------------
# configs and the on-disk cache (pure Python)
# ---------------------------------------------------------------------------------------------


def test_config_cache_roundtrip(tmp_path) -> None:
    path = tmp_path / "gpu.json"
    a = at.KernelConfig(16, 64, 64, 4, 1, 4, 3)
    b = at.KernelConfig(128, 128, 64, 1, 8, 8, 3)
    at._store(path, "k1", a)
    at._store(path, "k2", b)
    assert at._load(path) == {"k1": a, "k2": b}
    path.write_text("{not json")
    assert at._load(path) == {}  # a corrupt cache is ignored, not fatal


def test_heuristics_and_candidates_respect_caps() -> None:
    for variant in (v for v in at.VARIANTS if v not in (at.GEMV_WIDE, at.DOT_WIDE)):  # bk_cap means else there
        for m in (1, 16, 64, 4096):
            for bk_cap in (32, 64, 256):
                cfgs = [at.heuristic_config(variant, m, 8192, 8192, bk_cap, 132)]
                cfgs += at.candidate_configs(variant, m, 8192, 8192, bk_cap, 132)
                assert cfgs
                for c in cfgs:
                    assert c.split >= 1 and c.block_m >= 1 and c.block_n >= 16
                    if not variant.startswith("w8a8"):
                        assert c.block_k <= max(bk_cap, 16), (variant, c)
                    if variant != at.GEMV:
                        assert c.block_m >= 16 and c.block_k >= 32  # tl.dot minimums (int8: K >= 32)
    assert at.m_bucket(1) == 1 and at.m_bucket(3) == 4 and at.m_bucket(17) == 32 and at.m_bucket(10**6) == 4096
    key = at.make_key(at.GEMV, "codebook", 64, True, False, torch.bfloat16, 1, 8192, 8192)
    assert key == "wo_gemv|codebook|bs64|nest1|zp0|bfloat16|M1|N8192|K8192"


def test_launch_shrinks_configs_that_do_not_fit() -> None:
    """OutOfResources (too much shared memory) at launch -> fewer stages, then narrower tiles."""
    from triton.runtime.errors import OutOfResources

    tried: list[at.KernelConfig] = []

    def launch(cfg: at.KernelConfig) -> str:
        tried.append(cfg)
        if cfg.num_stages > 1 or cfg.block_n > 64:
            raise OutOfResources(300000, 232448, "shared memory")
        return "ok"

    start = at.KernelConfig(128, 256, 64, 1, 8, 8, 3)
    assert at.launch_fitting("k", torch.device("cpu"), start, launch) == "ok"
    assert [(c.num_stages, c.block_n) for c in tried] == [
        (3, 256),
        (2, 256),
        (1, 256),
        (2, 128),
        (1, 128),
        (2, 64),
        (1, 64),
    ]
    with pytest.raises(OutOfResources):
        at.launch_fitting("k", torch.device("cpu"), start, lambda c: launch(at.KernelConfig(1, 512, 1, 1, 1, 1, 9)))


def test_kernels_compile_for_sm90() -> None:
    """Lower a few specialisations all the way to a cubin for H100 (no GPU needed; ptxas is bundled)."""
    pytest.importorskip("triton.backends.nvidia")
    from qbackend.kernels.triton import aot

    wanted = {"gemv-nf4n-b64-bf16-al", "dot-small-nf4n-b64-bf16-al", "decode-nf4n-b64-bf16-al", "w8a8-small-bf16",
              "read-runs", "wide-m1-nf4n-b64-bf16-al", "wide-m4-int4-g128-bf16-al",
              "dotwide-m8-nf4n-b64-bf16-al"}  # fmt: skip
    reports = [aot.compile_spec(s) for s in aot.specs(quick=True) if s.name in wanted]
    assert len(reports) == len(wanted)
    bad = [(r.name, r.error or r.missing) for r in reports if not r.ok]
    assert not bad, bad


# ---------------------------------------------------------------------------------------------
# GPU only: bf16, larger shapes, autotuning with the on-disk cache, CUDA graphs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tmp_config_cache(tmp_path, monkeypatch):
    """Keep GPU tests from writing tuned configs into the user's cache."""
    monkeypatch.setenv("QBACKEND_TRITON_CACHE_DIR", str(tmp_path))
    at.clear_memory_cache()
    yield tmp_path
    at.clear_memory_cache()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 16, 64, 300])
def test_gpu_bf16_all_formats(m: int, tmp_config_cache) -> None:
    n, k = 512, 1024
    x = _x((m,), k, torch.bfloat16, seed=m)
    b = _bias(n, True)
    w = _codebook(n, k, "nf4", 64, True)
    _check(T.codebook_linear(x, *w, b, n, k, 64, 32), R.codebook_linear(x, *w, b, n, k, 64, 32))
    c4, s4, z4 = _int4(n, k, 128, True)
    _check(T.int4_linear(x, c4, s4, z4, b, n, k, 128), R.int4_linear(x, c4, s4, z4, b, n, k, 128))
    c8, s8 = _int8(n, k)
    _check(T.int8_linear(x, c8, s8, b, n, k), R.int8_linear(x, c8, s8, b, n, k))
    _check(T.w8a8_linear(x, c8, s8, b, None, n, k), R.w8a8_linear(x, c8, s8, b, None, n, k))
    gy = _x((m,), n, torch.bfloat16, seed=5)
    ref = (gy.float() @ R.decode_codebook(*w, n, k, 64, 32)).bfloat16()
    _check(T.codebook_linear_grad_input(gy, *w, n, k, 64, 32), ref)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("lut", ["global", "pairs", "select"])
def test_gpu_wide_dot_bf16(lut: str, tmp_config_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wide-K dot with its heuristic configs (bf16 tensor cores, split-K atomics) and in a CUDA graph."""
    monkeypatch.setattr(L, "WIDE_DOT_ROWS", {L.CODEBOOK: 64})
    monkeypatch.setattr(L, "WIDE_GEMV", False)
    monkeypatch.setattr(L, "LUT", lut)
    n, k = 520, 2048
    w = _codebook(n, k, "nf4", 64, True)
    b = _bias(n, True)
    for m in (2, 16, 33, 64):
        x = _x((m,), k, torch.bfloat16, seed=m)
        _check(T.codebook_linear(x, *w, b, n, k, 64, 32), R.codebook_linear(x, *w, b, n, k, 64, 32))
    x = _x((16,), k, torch.bfloat16, seed=1)
    T.codebook_linear(x, *w, b, n, k, 64, 32)  # configs and pair table exist before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = T.codebook_linear(x, *w, b, n, k, 64, 32)
    x.copy_(_x((16,), k, torch.bfloat16, seed=2))
    graph.replay()
    torch.cuda.synchronize()
    _check(out, R.codebook_linear(x, *w, b, n, k, 64, 32))


@pytest.mark.gpu
@gpu
def test_gpu_autotune_writes_cache(tmp_config_cache, monkeypatch) -> None:
    tmp_path = tmp_config_cache
    monkeypatch.setenv("QBACKEND_TRITON_AUTOTUNE", "1")
    n, k = 256, 512
    w = _codebook(n, k, "nf4", 64, True)
    x = _x((1,), k, torch.float16, seed=0)
    y = T.codebook_linear(x, *w, None, n, k, 64, 32)
    _check(y, R.codebook_linear(x, *w, None, n, k, 64, 32))
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and re.search(r"wo_gemv(_wide)?\|codebook[^|]*\|bs64", files[0].read_text())
    at.clear_memory_cache()
    _check(T.codebook_linear(x, *w, None, n, k, 64, 32), y)  # served from the file


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_replay(tmp_config_cache) -> None:
    n, k = 256, 512
    w = _codebook(n, k, "nf4", 64, True)
    x = _x((1,), k, torch.bfloat16, seed=0)
    T.codebook_linear(x, *w, None, n, k, 64, 32)  # tune outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        T.codebook_linear(x, *w, None, n, k, 64, 32)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = T.codebook_linear(x, *w, None, n, k, 64, 32)
    x.copy_(_x((1,), k, torch.bfloat16, seed=1))
    graph.replay()
    torch.cuda.synchronize()
    _check(y, R.codebook_linear(x, *w, None, n, k, 64, 32))


# ---------------------------------------------------------------------------------------------
# large M: decode W, then the library GEMM (thresholds lowered so small shapes take that path)
# ---------------------------------------------------------------------------------------------


def _decode_cases() -> list[tuple[str, tuple, tuple, Callable]]:
    """(id, forward weight args, trailing ints, reference decode) for every layout the decode kernel serves."""
    out = []
    for n, k, bs, kind, nested in CODEBOOK_CASES:
        w = _codebook(n, k, kind, bs, nested)
        out.append((f"{kind}-{n}x{k}-bs{bs}-nest{int(nested)}", T.codebook_linear, T.codebook_linear_grad_input,
                    R.codebook_linear, w, (n, k, bs, 32),
                    lambda w=w, n=n, k=k, bs=bs: R.decode_codebook(*w, n, k, bs, 32)))  # fmt: skip
    for n, k, g, sym in INT4_CASES:
        w = _int4(n, k, g, sym)
        out.append((f"int4-{n}x{k}-g{g}-sym{int(sym)}", T.int4_linear, T.int4_linear_grad_input, R.int4_linear, w,
                    (n, k, g), lambda w=w, n=n, k=k, g=g: R.decode_int4(*w, n, k, g)))
    for n, k in [(40, 64), (23, 75)]:
        w = _int8(n, k)
        out.append((f"int8-{n}x{k}", T.int8_linear, T.int8_linear_grad_input, R.int8_linear, w, (n, k),
                    lambda w=w, n=n: w[0].reshape(n, -1).float() * w[1].reshape(-1, 1).float()))
    return out


@pytest.mark.parametrize("m", [1, 6])
@pytest.mark.parametrize("case", _decode_cases(), ids=lambda c: c[0])
def test_decode_then_gemm(case: tuple, m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from qbackend.kernels.triton import linear as L

    _, fwd, grad, ref_fwd, w, ints, dense = case
    for name in ("_DECODE_M", "_NESTED_DECODE_M", "_NESTED_GRAD_DECODE_M"):
        monkeypatch.setattr(L, name, 1)
    monkeypatch.setattr(L, "WIDE_DOT_ROWS", {L.CODEBOOK: 0})  # it would take nested M = 6 before decoding
    decoded: list[torch.Tensor] = []
    real = L._decoded
    monkeypatch.setattr(L, "_decoded", lambda *a: decoded.append(real(*a)) or decoded[-1])
    x = _x((m,), ints[1], torch.float32, seed=m)
    b = _bias(ints[0], on=True)
    _check(fwd(x, *w, b, *ints), ref_fwd(x, *w, b, *ints))
    gy = _x((2, m), ints[0], torch.float32, seed=m + 1)
    _check(grad(gy, *w, *ints), gy @ dense())
    assert len(decoded) == 2  # both directions took the decode path
    assert torch.equal(decoded[0].cpu(), dense().cpu())  # the fp32 decode is exact
