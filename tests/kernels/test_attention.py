"""``qbackend::decode_attention``: the C++ kernel (every ISA build this CPU runs) against sdpa."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.kernels import attention as attn
from qbackend.kernels.cpu import _build

_ORDER = ("generic", "avx2", "avx512")


def _libs() -> list[tuple[str, object]]:
    """(variant, library) for every ISA build this CPU can run."""
    if _build.load() is None:
        return []
    own = _ORDER.index(_build.cpu_variant())
    return [(v, _build.load_variant(v)) for v in _ORDER[: own + 1]]


LIBS = _libs()
needs_lib = pytest.mark.skipif(not LIBS, reason="C++ CPU kernels unavailable")


def _sdpa(q, k, v, mask=None, scale=None, causal=False):
    return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=True)


def _close(got, want, q=None, k=None, v=None, mask=None, scale=None, causal=False):
    """got == want to fp32 rounding. With the inputs: against the fp64 sdpa, within a bound that grows with the
    largest logit (softmax turns a score's rounding error e into a relative error e of its weight)."""
    assert got is not None
    assert got.shape == want.shape and got.is_contiguous()
    if q is None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6, equal_nan=True)
        return
    m64 = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    want64 = _sdpa(q.double(), k.double(), v.double(), m64, scale, causal)
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.double() @ k.double().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(2, 3)).abs() * sc
    bound = 2e-6 * (1 + logits.max().item()) * max(1.0, v.abs().max().item()) if logits.numel() else 2e-6
    torch.testing.assert_close(got.double(), want64, rtol=1e-5, atol=bound, equal_nan=True)


@st.composite
def cases(draw):
    b = draw(st.integers(1, 3))
    hk = draw(st.integers(1, 4))
    n_rep = draw(st.sampled_from([1, 2, 3, 8]))
    n = draw(st.integers(1, 8))
    s = draw(st.integers(1, 300))
    d = draw(st.sampled_from([1, 3, 8, 16, 19, 64, 80, 128]))
    dv = draw(st.sampled_from([d, 5, 64]))
    mask = draw(st.sampled_from(["none", "bool", "float", "causal"]))
    mshape = draw(st.sampled_from([(b, 1, n, s), (1, 1, 1, s), (b, hk * n_rep, n, s), (n, s)]))
    layout = draw(st.sampled_from(["contiguous", "cache", "transposed_q"]))
    scale = draw(st.sampled_from([None, 0.125, 1.7]))
    seed = draw(st.integers(0, 2**16))
    return b, hk, n_rep, n, s, d, dv, mask, mshape, layout, scale, seed


def _make(b, hk, n_rep, n, s, d, dv, mask, mshape, layout, seed):
    g = torch.Generator().manual_seed(seed)
    hq = hk * n_rep
    if layout == "transposed_q":  # as the q projection's view: [B, L, H, D] transposed
        q = torch.randn(b, n, hq, d, generator=g).transpose(1, 2)
    else:
        q = torch.randn(b, hq, n, d, generator=g)
    if layout == "cache":  # a slice of a longer static cache: strided heads and batch
        k = torch.randn(b, hk, s + 7, d, generator=g)[:, :, :s]
        v = torch.randn(b, hk, s + 7, dv, generator=g)[:, :, 3 : s + 3]
    else:
        k, v = torch.randn(b, hk, s, d, generator=g), torch.randn(b, hk, s, dv, generator=g)
    m = None
    if mask == "bool":
        m = torch.rand(mshape, generator=g) > 0.3
    elif mask == "float":
        m = torch.randn(mshape, generator=g) * 3
        m[torch.rand(mshape, generator=g) > 0.8] = float("-inf")
    return q, k, v, m


@needs_lib
@settings(max_examples=120, deadline=None)
@given(cases())
def test_kernel_matches_sdpa(case):
    b, hk, n_rep, n, s, d, dv, mask, mshape, layout, scale, seed = case
    q, k, v, m = _make(b, hk, n_rep, n, s, d, dv, mask, mshape, layout, seed)
    want = _sdpa(q, k, v, m, scale, mask == "causal")
    for _, lib in LIBS:
        _close(attn.run_kernel(lib, q, k, v, m, scale, mask == "causal"), want, q, k, v, m, scale, mask == "causal")


@needs_lib
@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("s", [1, 127, 640, 1100])
def test_long_cache_split_over_threads(threads, s):
    """Long KV spans are split over several tasks and combined: same result for any thread count."""
    q, k, v, m = _make(1, 4, 8, 1, s, 64, 64, "bool", (1, 1, 1, s), "cache", 3)
    want = _sdpa(q, k, v, m)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _, lib in LIBS:
            _close(attn.run_kernel(lib, q, k, v, m), want)
    finally:
        torch.set_num_threads(old)


@needs_lib
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros_like_sdpa(kind):
    q, k, v, _ = _make(2, 2, 4, 3, 200, 16, 16, "none", None, "contiguous", 5)
    keep = torch.ones(2, 1, 3, 200, dtype=torch.bool)
    keep[0, :, 1] = False  # one query position of batch 0 sees nothing
    m = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    want = _sdpa(q, k, v, m)
    assert (want[0, :, 1] == 0).all()
    for _, lib in LIBS:
        _close(attn.run_kernel(lib, q, k, v, m), want)


@needs_lib
@pytest.mark.parametrize("where", ["q", "k_attended", "k_masked", "v_attended", "v_masked", "inf_k"])
def test_nan_and_inf_propagate_like_sdpa(where):
    """sdpa adds a bool mask as -inf: a NaN score stays NaN, and masked positions (0 * NaN) still count."""
    q, k, v, _ = _make(1, 2, 4, 2, 150, 16, 16, "none", None, "contiguous", 9)
    m = torch.ones(1, 1, 2, 150, dtype=torch.bool)
    m[..., 100:] = False
    if where == "q":
        q[0, 3, 1, 5] = float("nan")
    elif where.startswith("k"):
        k[0, 1, 120 if where.endswith("masked") else 7, 2] = float("nan")
    elif where.startswith("v"):
        v[0, 0, 120 if where.endswith("masked") else 7, 2] = float("nan")
    else:
        k[0, 0, 50, :] = float("inf")
    want = _sdpa(q, k, v, m)
    assert want.isnan().any()
    for _, lib in LIBS:
        _close(attn.run_kernel(lib, q, k, v, m), want)


@needs_lib
def test_empty_and_degenerate_shapes():
    for b, n, s in [(0, 1, 5), (2, 1, 0), (1, 0, 4)]:
        q, k, v = torch.randn(b, 4, n, 8), torch.randn(b, 2, s, 8), torch.randn(b, 2, s, 8)
        want = _sdpa(q, k, v)
        for _, lib in LIBS:
            _close(attn.run_kernel(lib, q, k, v), want)


def test_op_checks_and_falls_back():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    m = torch.rand(1, 1, 1, 6) > 0.5
    torch.testing.assert_close(torch.ops.qbackend.decode_attention(q, k, v, m), _sdpa(q, k, v, m), rtol=1e-5, atol=1e-6)
    # not fp32 / not unit stride: the reference (same meaning)
    qd, kd, vd = q.double(), k.double(), v.double()
    torch.testing.assert_close(torch.ops.qbackend.decode_attention(qd, kd, vd, m), _sdpa(qd, kd, vd, m))
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)  # unit stride along positions, not the head dim
    torch.testing.assert_close(attn.decode_attention_cpu(q, kt, v), _sdpa(q, kt, v), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="head count dividing"):
        torch.ops.qbackend.decode_attention(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        torch.ops.qbackend.decode_attention(q, k, v, torch.ones(1, 1, 1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        torch.ops.qbackend.decode_attention(q, k, v, torch.zeros(1, 1, 1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="4-D"):
        torch.ops.qbackend.decode_attention(q[0], k[0], v[0])


def test_op_fake_and_opcheck():
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 5)
    torch.library.opcheck(torch.ops.qbackend.decode_attention.default, (q, k, v, None, 0.5, True))
    m = torch.zeros(2, 1, 3, 6)
    torch.library.opcheck(torch.ops.qbackend.decode_attention.default, (q, k, v, m))


@needs_lib
@settings(max_examples=60, deadline=None)
@given(
    s=st.integers(2, 700), cut=st.integers(1, 700), kind=st.sampled_from(["bool", "float", "causal"]),
    n=st.integers(1, 4), layout=st.sampled_from(["contiguous", "cache"]), threads=st.sampled_from([1, 2]),
    nan=st.sampled_from([None, "k", "v"]), seed=st.integers(0, 99),
)  # fmt: skip
def test_unattended_tail_of_a_static_cache_is_skipped_exactly(s, cut, kind, n, layout, threads, nan, seed):
    """A static KV cache's positions after the last attended one add exactly zero: with finite K/V there the
    kernel skips them (same result as sdpa over all of them); NaN there still comes out as NaN, as in sdpa."""
    cut = min(cut, s - 1)
    q, k, v, _ = _make(1, 2, 7, n, s, 64, 64, "none", None, layout, seed)
    m, causal = None, kind == "causal"
    if kind == "bool":
        m = torch.ones(1, 1, n, s, dtype=torch.bool)
        m[..., cut:] = False
    elif kind == "float":
        m = torch.zeros(1, 1, n, s)
        m[..., cut:] = float("-inf")
    end = n if causal else cut  # causal (top-left): row l attends positions <= l
    tail = end < s
    if nan and tail:
        (k if nan == "k" else v)[0, 1, end + (s - end) // 2, 3] = float("nan")
    want = _sdpa(q, k, v, m, None, causal)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _, lib in LIBS:
            before = lib.qb_decode_attention_trimmed()
            got = attn.run_kernel(lib, q, k, v, m, None, causal)
            # is_causal: sdpa never reads past the last row's positions (NaN there stays out, as here)
            assert lib.qb_decode_attention_trimmed() - before == (1 if tail and (not nan or causal) else 0)
            if nan and tail:
                assert want.isnan().any() != causal
                _close(got, want)  # NaN where sdpa has NaN (the fp64 bound needs finite inputs)
            else:
                _close(got, want, q, k, v, m, None, causal)
    finally:
        torch.set_num_threads(old)
