"""Prepared CPU kernel calls (qbackend.kernels.cpu.fast_path): bit-identical to the regular kernels in every
format and compute mode, re-prepared when a weight changes, and out of the way where they do not apply."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qbackend
from qbackend.core.config import QuantConfig
from qbackend.kernels import compute_policy, direct, ops
from qbackend.kernels import cpu as kcpu
from qbackend.kernels.cpu import fast_path, finite, int8_compute
from qbackend.workflows.weight_only import QuantizedLinear

FORMATS = ("nf4", "fp4", "int4", "int8")
MODES = ("fp32", "int8", "int16", "bf16")
# (format, mode) pairs with a prepared call: every format in fp32 and int8; int16 for int8 weights only
PREPARED_CASES = [(f, m) for f in FORMATS for m in ("fp32", "int8")] + [("int8", "int16")]
LIB = kcpu.lib() is not None
VNNI = int8_compute._lib() is not None


def _layer(fmt: str, compute: str, n: int = 96, k: int = 128, bias: bool = True, seed: int = 0) -> QuantizedLinear:
    torch.manual_seed(seed)
    w, b = torch.randn(n, k) * 0.05, (torch.randn(n) if bias else None)
    cfg = QuantConfig(format=fmt, blocksize=32) if fmt == "int4" else QuantConfig(format=fmt)
    try:
        q = QuantizedLinear.from_weight(w, b, cfg.scheme, compute=compute)
    except compute_policy.ComputeUnavailable:
        pytest.skip(f"{compute} compute unavailable on this CPU")
    for name, t in list(q.named_buffers()):  # own copies: the code tables are shared by every layer of a format
        setattr(q, name, t.clone())
    return q


def _tensors(q: QuantizedLinear) -> tuple:
    return tuple(None if n is None else getattr(q, n) for n in q._arg_names)


def _regular(q: QuantizedLinear, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Through torch.ops: dispatcher, validation, the registered kernel (no prepared call)."""
    return q.op(x, *_tensors(q), q.bias, *q.statics, mode or q.compute)


def _fast(q: QuantizedLinear):
    fast = ops.fast_kernel(q.op._opname, "cpu")
    assert fast is not None
    return fast


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), f"max diff {(a - b).abs().nan_to_num(0.0).max()}"


def _takes(q: QuantizedLinear, mode: str) -> bool:
    """Whether a prepared call exists here for the layer (library, ISA)."""
    return _fast(q).prepared(_tensors(q), q.statics, mode) is not None


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 128), (3, 128), (2, 1, 128), (128,), (17, 128), (129, 128), (300, 128)])
def test_fast_path_is_bit_identical_to_the_regular_kernel(fmt, mode, shape):
    q = _layer(fmt, mode)
    x = torch.randn(*shape)
    with torch.no_grad():
        want = _regular(q, x, q.compute)
        got = q(x)
        direct_got = ops.direct_kernel(q.op._opname, "cpu")(x, *_tensors(q), q.bias, *q.statics, q.compute)
        kw_got = ops.direct_kernel(q.op._opname, "cpu")(x, *_tensors(q), q.bias, *q.statics, compute=q.compute)
    for y in (got, direct_got, kw_got):
        _same(y, want)
        assert y.data_ptr() != x.data_ptr()


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
@pytest.mark.parametrize(("fmt", "mode"), PREPARED_CASES)
def test_fast_path_takes_small_calls(fmt, mode):
    if mode in ("int8", "int16") and not VNNI:
        pytest.skip("no AVX512-VNNI")
    q = _layer(fmt, mode)
    if mode == "fp32" and fmt == "int8" and not kcpu.lib().qb_has_avx512():
        pytest.skip("the fused int8 kernel needs AVX-512")
    assert _takes(q, q.compute)
    x = torch.randn(4, 128)
    y = _fast(q).linear(x, _tensors(q), q.bias, q.statics, q.compute)
    assert y is not None
    _same(y, _regular(q, x))


@pytest.mark.skipif(not LIB or not VNNI, reason="no AVX512-VNNI")
def test_int16_prepared_call_follows_the_packing_switch_and_the_packed_copy(monkeypatch):
    from qbackend.kernels.cpu import int16_compute

    q = _layer("int8", "int16")
    x = torch.randn(4, 128)
    y = _fast(q).linear(x, _tensors(q), q.bias, q.statics, "int16")
    assert y is not None
    _same(y, _regular(q, x))
    monkeypatch.setattr(int16_compute, "PACKING", False)  # declines: the regular (canonical) kernels run
    assert _fast(q).linear(x, _tensors(q), q.bias, q.statics, "int16") is None
    monkeypatch.setattr(int16_compute, "PACKING", True)
    int16_compute._CACHE.entries.clear()  # the copy gone (held weakly by the prepared call): made again
    assert int16_compute.packed_nbytes() == 0
    _same(_fast(q).linear(x, _tensors(q), q.bias, q.statics, "int16"), y)
    assert int16_compute.packed_nbytes() > 0


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ("fp32", "int8", "int16"))
def test_nan_inf_and_overflow_rows_match_the_regular_path(fmt, mode):
    q = _layer(fmt, mode)
    x = torch.randn(5, 128)
    x[1, 3] = math.nan
    x[2, 0] = math.inf
    x[3] *= 1e36  # unscaled partial sums overflow fp32: the regular path redoes that row scaled
    with torch.no_grad():
        _same(q(x), _regular(q, x))
        _same(q(x[3:4]), _regular(q, x[3:4]))
        _same(q(x[1:2]), _regular(q, x[1:2]))


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ("fp32", "int8", "int16"))
def test_in_place_weight_changes_are_seen(fmt, mode):
    q = _layer(fmt, mode)
    other = _layer(fmt, mode, seed=1)
    x = torch.randn(2, 128)
    with torch.no_grad():
        before = q(x)
        for name in q._arg_names:  # load_state_dict's way: copy_ into the same tensors (versions bump)
            if name is not None:
                getattr(q, name).copy_(getattr(other, name))
        q.bias.copy_(other.bias)
        _same(q(x), _regular(other, x))
        assert not torch.equal(q(x), before)


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
@pytest.mark.parametrize("fmt", ("nf4", "fp4"))
@pytest.mark.parametrize("mode", ("fp32", "int8"))
def test_code_table_changed_behind_the_version_counter_is_seen(fmt, mode):
    """The int8 mode bakes the table's int8 image into its descriptor: a .data write must re-prepare."""
    q = _layer(fmt, mode)
    x = torch.randn(2, 128)
    with torch.no_grad():
        q(x)
        q.table.data.mul_(-0.5)  # no version bump
        _same(q(x), _regular(q, x))
        _same(q(x[:1]), _regular(q, x[:1]))  # prepared again after the change: the fast call, new table
        p = _fast(q).prepared(_tensors(q), q.statics, mode)
        if p is not None:
            y = torch.empty(1, q.out_features)
            rc = p.call(x.data_ptr(), 1, q.bias.data_ptr(), y.data_ptr(), 1)
            assert rc == 0 and torch.equal(y, _regular(q, x[:1]))


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
def test_replaced_buffers_and_new_tensors_at_old_addresses_are_prepared_again():
    q = _layer("nf4", "fp32")
    other = _layer("nf4", "fp32", seed=1)
    x = torch.randn(1, 128)
    with torch.no_grad():
        q(x)
        for name in q._arg_names:
            if name is not None:
                setattr(q, name, getattr(other, name).clone())
        q.bias = other.bias
        _same(q(x), _regular(other, x))
        # resize_ keeps the address but bumps the version: validated again, and the error is the op's
        q.codes.resize_(q.codes.numel() - 2)
        with pytest.raises(ValueError, match="codes"):
            q(x)


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
@pytest.mark.parametrize("mode", ("fp32", "int8"))
def test_repeat_lookups_see_any_weight_replaced_or_resized(mode):
    """The per-weight front cache (first tensor's id) must not hide a change to another weight tensor."""
    q = _layer("nf4", mode)
    other = _layer("nf4", mode, seed=1)
    fast = _fast(q)
    x = torch.randn(1, 128)
    with torch.no_grad():
        p = fast.prepared(_tensors(q), q.statics, mode)
        assert p is not None and fast.prepared(_tensors(q), q.statics, mode) is p
        q.nested_codes = other.nested_codes.clone()  # a later tensor replaced, the first (codes) kept
        _same(q(x), _regular(q, x))
        assert fast.prepared(_tensors(q), q.statics, mode) is not p
        p2 = fast.prepared(_tensors(q), q.statics, mode)
        q.nested_absmax.resize_(q.nested_absmax.numel() + 1)  # same object, version bumped: validated again
        assert fast.prepared(_tensors(q), q.statics, mode) is not p2
        with torch.inference_mode():  # weights without version counters: the full key, same results
            qi = _layer("nf4", mode)
        _same(qi(x), _regular(qi, x))
        _same(qi(x), _regular(qi, x))


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
def test_errors_and_other_inputs_go_through_the_validated_path():
    q = _layer("nf4", "fp32")
    with torch.no_grad():
        with pytest.raises(ValueError, match="in_features"):
            q(torch.randn(2, 127))
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            q(torch.randint(0, 3, (2, 128)))
        for x in (torch.randn(3, 128, dtype=torch.bfloat16), torch.randn(128, 3).t(), torch.randn(0, 128)):
            _same(q(x), _regular(q, x))
        b = q.bias
        x = torch.randn(2, 128)
        q.bias = torch.nn.Parameter(b.bfloat16(), requires_grad=False)  # valid, not fp32: the regular path
        _same(q(x), _regular(q, x))
        q.bias = torch.nn.Parameter(b.double(), requires_grad=False)
        with pytest.raises(TypeError, match="bias"):
            q(x)
        q.bias = torch.nn.Parameter(b[:-1].clone(), requires_grad=False)
        with pytest.raises(ValueError, match="bias"):
            q(x)
        q.bias = None
        _same(q(x), _regular(q, x))


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
def test_portable_switch_and_fused_limits_still_apply(monkeypatch):
    q = _layer("nf4", "fp32")
    x = torch.randn(6, 128)
    with torch.no_grad():
        monkeypatch.setattr(kcpu, "_force_portable", True)
        assert _fast(q).linear(x, _tensors(q), q.bias, q.statics, "fp32") is None
        _same(q(x), _regular(q, x))
        monkeypatch.setattr(kcpu, "_force_portable", False)
        monkeypatch.setattr(kcpu, "FUSED_MAX_M", 4)
        assert _fast(q).linear(x, _tensors(q), q.bias, q.statics, "fp32") is None
        _same(q(x), _regular(q, x))  # the panel path (not bit-equal to the fused kernels)
        assert _fast(q).linear(x[:4], _tensors(q), q.bias, q.statics, "fp32") is not None


def test_grad_and_tracing_still_use_the_dispatcher():
    q = _layer("int8", "fp32")
    x = torch.randn(2, 128, requires_grad=True)
    y = q(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch._dynamo.reset()
    with torch.no_grad():
        xs = torch.randn(3, 128)
        got = torch.compile(q, backend="qbackend", fullgraph=True, dynamic=False)(xs)
        _same(got, _regular(q, xs))
        exported = torch.export.export(q, (xs,))
    assert any("qbackend" in str(n.target) for n in exported.graph.nodes)


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
def test_compiled_model_sees_a_changed_parameter():
    """Stale weights in compiled code are still detected (the stamp guard runs before the graph)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(128, 64))
    torch._dynamo.reset()
    c = torch.compile(m, backend="qbackend", dynamic=False)
    x = torch.randn(1, 128)
    with torch.no_grad():
        c(x)
        m[0].weight.mul_(-1.0)
        got = c(x)
        ref = torch.nn.Sequential(torch.nn.Linear(128, 64))
        ref.load_state_dict(m.state_dict())
        qbackend.quantize_(ref, {"preset": "nf4"})
        torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-5)


def test_all_finite():
    for n in (1, 63, 64, 65, 300, (1 << 16) + 5):
        y = torch.randn(n)
        assert finite.all_finite(y)
        for v in (math.nan, math.inf, -math.inf):
            for at in (0, n // 2, n - 1):
                z = y.clone()
                z[at] = v
                assert not finite.all_finite(z)
    assert finite.all_finite(torch.empty(0))
    assert finite.all_finite(torch.full((70,), 3e38))  # finite even though their sum is not
    assert finite.all_finite(torch.randn(4, 8).t())  # non-contiguous: the torch check
    assert not finite.all_finite(torch.tensor([1.0, math.nan], dtype=torch.bfloat16))


def test_fast_kernels_registered_only_with_the_library():
    names = [f.op_name for f in ops.FAMILIES.values() if f.kernel in ("codebook", "int4", "int8")]
    for name in names:
        fast = ops.fast_kernel(name, "cpu")
        assert (fast is not None) == LIB
        if fast is not None:
            assert ops.direct_kernel(name, "cpu") is fast and direct.KERNELS[name] is fast


def test_fallback_without_the_library():
    code = (
        "import torch, qbackend\n"
        "from qbackend.kernels import ops\n"
        "from qbackend.kernels import cpu\n"
        "assert cpu.lib() is None and ops.fast_kernel('nf4_linear', 'cpu') is None\n"
        "torch.manual_seed(0)\n"
        "from qbackend.core.config import QuantConfig\n"
        "from qbackend.workflows.weight_only import QuantizedLinear\n"
        "w, b, x = torch.randn(32, 64) * 0.05, torch.randn(32), torch.randn(3, 64)\n"
        "want = torch.nn.functional.linear(x, w, b)\n"
        "q = QuantizedLinear.from_weight(w, b, QuantConfig.preset('nf4').scheme)\n"
        "with torch.no_grad():\n"
        "    y = q(x)\n"
        "    t = [None if n is None else getattr(q, n) for n in q._arg_names]\n"
        "    assert torch.equal(y, q.op(x, *t, q.bias, *q.statics, q.compute))\n"
        "assert (y - want).abs().max() < 0.1\n"
        "print('ok')\n"
    )
    env = {**os.environ, "QBACKEND_CPU_KERNELS": "0"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_prepared_calls_are_cached_per_weight():
    if not LIB:
        pytest.skip("no C++ kernel library")
    q = _layer("int4", "fp32")
    fast = _fast(q)
    p = fast.prepared(_tensors(q), q.statics, "fp32")
    assert p is not None and fast.prepared(_tensors(q), q.statics, "fp32") is p
    assert isinstance(p, fast_path.Prepared)


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS), mode=st.sampled_from(("fp32", "int8")), n=st.sampled_from((1, 17, 64)),
    k=st.sampled_from((32, 48, 100, 128, 160)), m=st.integers(0, 140), lead=st.booleans(), bias=st.booleans(),
)  # fmt: skip
def test_property_any_shape_matches_the_regular_path(fmt, mode, n, k, m, lead, bias):
    q = _layer(fmt, mode, n=n, k=k, bias=bias, seed=m)
    x = torch.randn(m, k) if not lead else torch.randn(1, m, k)
    with torch.no_grad():
        _same(q(x), _regular(q, x))
        direct_fn = ops.direct_kernel(q.op._opname, "cpu")
        _same(direct_fn(x, *_tensors(q), q.bias, *q.statics, compute=q.compute), _regular(q, x))


# ---- w8a8_linear's fast form (no per-call validation) ------------------------------------------------


def _w8a8_layer(n: int, k: int, bias: bool, static: bool, seed: int):
    from qbackend import W8A8Linear

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n * k,), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    act = torch.tensor([0.02]) if static else None
    return W8A8Linear(codes, scale, b, out_features=n, in_features=k, act_scale=act)


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
@settings(max_examples=40, deadline=None)
@given(
    m=st.sampled_from([0, 1, 2, 5, 8, 13, 64, 127, 128, 130]),
    n=st.integers(1, 70),
    k=st.integers(1, 200),
    bias=st.booleans(),
    static=st.booleans(),
    special=st.sampled_from([None, "nan", "inf", "big"]),
    seed=st.integers(0, 2**16),
)
def test_w8a8_module_fast_form_is_bit_identical_to_the_op(m, n, k, bias, static, special, seed):
    mod = _w8a8_layer(n, k, bias, static, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))
    if special is not None and m > 0:
        x[m // 2, k // 2] = {"nan": math.nan, "inf": math.inf, "big": 3e37}[special]
    want = torch.ops.qbackend.w8a8_linear(x, mod.codes, mod.scale, mod.bias, mod.act_scale, n, k)
    with torch.no_grad():
        got = mod(x)
        got3 = mod(x.reshape(1, m, k))
    _same(got, want)
    _same(got3, want.reshape(1, m, n))


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
def test_w8a8_fast_form_takes_small_calls_and_declines_the_rest():
    mod = _w8a8_layer(48, 96, True, False, 0)
    fast = ops.fast_kernel("w8a8_linear", "cpu")
    assert fast is not None and ops.direct_kernel("w8a8_linear", "cpu") is fast
    args = (mod.codes, mod.scale, mod.bias, mod.act_scale, 48, 96)
    x = torch.randn(8, 96)
    if kcpu._w8a8.available():
        _same(fast.linear_args(x, *args), torch.ops.qbackend.w8a8_linear(x, *args))
        # M past the canonical kernel's range: the packed weight's tiles take it
        x200 = torch.randn(200, 96)
        _same(fast.linear_args(x200, *args), torch.ops.qbackend.w8a8_linear(x200, *args))
    # not taken: other dtypes, non-contiguous x, M past the packed tiles, a wrong weight size, M = 0
    assert fast.linear_args(x.bfloat16(), *args) is None
    assert fast.linear_args(torch.randn(96, 8).t(), *args) is None
    assert fast.linear_args(torch.randn(kcpu._w8a8.PACKED_MAX_M + 1, 96), *args) is None
    assert fast.linear_args(x, mod.codes[:-1], *args[1:]) is None
    assert fast.linear_args(torch.randn(0, 96), *args) is None
    # the fast form's __call__ (compiled code) still runs everything, through the regular kernel where needed
    _same(fast(x.bfloat16(), *args), torch.ops.qbackend.w8a8_linear(x.bfloat16(), *args))
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        mod.codes = mod.codes[:-1]
        mod(x)
