"""``qbackend::linear_group``: each member's output bit-identical to its own op's, on the default kernel and
on the CPU kernel compiled code calls (the one-C-call group path included), whatever the input holds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.core.config import QuantConfig
from qbackend.kernels import compute_policy, ops
from qbackend.kernels import cpu as kcpu
from qbackend.kernels import linear_group as lg
from qbackend.kernels.cpu import fast_path, int8_compute, int16_compute
from qbackend.workflows.weight_only import QuantizedLinear

GROUP = torch.ops.qbackend.linear_group
LIB = kcpu.lib() is not None
VNNI = int8_compute._lib() is not None
PACKS16 = int16_compute.packs()  # int8 weights in int16 compute run on packed copies here (AVX512-VNNI)


def _layer(fmt: str, compute: str, n: int, k: int, bias: bool, seed: int) -> QuantizedLinear:
    cfg = QuantConfig(format=fmt, blocksize=32) if fmt == "int4" else QuantConfig(format=fmt)
    return _member(cfg, n, k, bias, seed, compute)


def _member(cfg: QuantConfig, n: int, k: int, bias: bool, seed: int, compute: str = "int8") -> QuantizedLinear:
    torch.manual_seed(seed)
    w, b = torch.randn(n, k) * 0.05, (torch.randn(n) if bias else None)
    try:
        q = QuantizedLinear.from_weight(w, b, cfg.scheme, compute=compute)
    except compute_policy.ComputeUnavailable:
        pytest.skip(f"{compute} compute unavailable on this CPU")
    for name, t in list(q.named_buffers()):  # own copies: the code tables are shared by every layer of a format
        setattr(q, name, t.clone())
    return q


def _tensors(q: QuantizedLinear) -> tuple:
    return tuple(None if n is None else getattr(q, n) for n in q._arg_names)


def _regular(q: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """Through torch.ops: dispatcher, validation, the registered kernel (no prepared call)."""
    return q.op(x, *_tensors(q), q.bias, *q.statics, q.compute)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), f"max diff {(a - b).abs().nan_to_num(0.0).max()}"


def _args(layers) -> tuple[list, list]:
    tensors, ints = [], []
    for q in layers:
        tensors += [*_tensors(q), q.bias]
        ints += list(q.statics)
    return tensors, ints


def _want(layers, x: torch.Tensor) -> torch.Tensor:
    """The members through torch.ops (dispatcher, validation, the registered kernel), flattened, in order."""
    return torch.cat([_regular(q, x).reshape(-1) for q in layers])


def _group(fmt: str, mode: str, widths=(40, 17, 64), k: int = 128):
    return [_layer(fmt, mode, n=n, k=k, bias=i % 2 == 1, seed=i) for i, n in enumerate(widths)]


@pytest.mark.skipif(not LIB, reason="no C++ kernel library")
@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(("nf4", "fp4", "int4", "int8")), mode=st.sampled_from(("int8", "fp32")),
    widths=st.lists(st.sampled_from((1, 17, 64, 96)), min_size=1, max_size=3),
    k=st.sampled_from((32, 48, 100, 128, 160)), m=st.integers(0, 10), lead=st.booleans(),
    special=st.sampled_from((None, "nan", "inf", "big")),
)  # fmt: skip
def test_property_members_match_their_own_ops(fmt, mode, widths, k, m, lead, special):
    layers = _group(fmt, mode, widths, k)
    x = torch.randn(m, k)
    if special and m:
        row = m // 2
        if special == "big":
            x[row] *= 1e36  # partial sums overflow fp32: the member's regular kernel redoes it scaled
        else:
            x[row, k // 3] = math.nan if special == "nan" else math.inf
    if lead:
        x = x.reshape(1, m, k)
    tensors, ints = _args(layers)
    name = layers[0].op._opname
    with torch.no_grad():
        want = _want(layers, x)
        for got in (lg._direct(x, tensors, ints, name, mode), GROUP(x, tensors, ints, name, mode)):
            _same(got, want)
            assert got.data_ptr() != x.data_ptr() or not got.numel()


@pytest.mark.skipif(not VNNI, reason="no AVX512-VNNI")
@pytest.mark.parametrize("fmt", ("nf4", "fp4", "int4", "int8"))
@pytest.mark.parametrize("m", (1, 3))
def test_one_c_call_takes_small_finite_groups_and_declines_the_rest(fmt, m):
    layers = _group(fmt, "int8")
    tensors, ints = _args(layers)
    fast = ops.fast_kernel(layers[0].op._opname, "cpu")
    x = torch.randn(1, m, 128)
    with torch.no_grad():
        y = fast_path.group_linear(fast, x, tensors, ints, "int8")
        assert y is not None
        _same(y, _want(layers, x))
        x[0, 0, 5] = math.nan  # NaN/Inf rows: the members' own kernels (exact fp32 for those rows)
        assert fast_path.group_linear(fast, x, tensors, ints, "int8") is None
        _same(lg._direct(x, tensors, ints, layers[0].op._opname, "int8"), _want(layers, x))
        x = torch.randn(m, 128) * 3e38  # outputs overflow to Inf: declined, the members' kernels say what they are
        assert fast_path.group_linear(fast, x, tensors, ints, "int8") is None
        _same(lg._direct(x, tensors, ints, layers[0].op._opname, "int8"), _want(layers, x))
        assert fast_path.group_linear(fast, x.t().contiguous().t(), tensors, ints, "int8") is None  # not contiguous


@pytest.mark.skipif(not VNNI, reason="no AVX512-VNNI")
def test_in_place_weight_changes_and_replaced_tensors_are_seen():
    layers = _group("nf4", "int8")
    name = layers[0].op._opname
    x = torch.randn(1, 128)
    with torch.no_grad():
        tensors, ints = _args(layers)
        before = lg._direct(x, tensors, ints, name, "int8")  # prepared
        other = _layer("nf4", "int8", n=17, k=128, bias=False, seed=9)
        layers[1].codes.copy_(other.codes)  # in place: same address, values read at call time
        layers[2].table.mul_(-1.0)  # the table's int8 image is baked into the descriptor: re-prepared
        after = lg._direct(x, tensors, ints, name, "int8")
        _same(after, _want(layers, x))
        assert not torch.equal(after[40:], before[40:]) and torch.equal(after[:40], before[:40])
        layers[0].codes = layers[0].codes.flip(0)  # a replaced tensor
        tensors, ints = _args(layers)
        replaced = lg._direct(x, tensors, ints, name, "int8")
        _same(replaced, _want(layers, x))
        assert not torch.equal(replaced[:40], before[:40])


def test_fake_shape_and_errors():
    layers = _group("int4", "fp32")
    tensors, ints = _args(layers)
    name = layers[0].op._opname
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        y = GROUP(torch.empty(2, 3, 128), tensors, ints, name, "fp32")
    assert tuple(y.shape) == (6 * (40 + 17 + 64),)
    with pytest.raises(ValueError, match="linear_group.*whole members"):
        GROUP(torch.randn(1, 128), tensors[:-1], ints, name, "fp32")
    with pytest.raises(ValueError, match="weight-only linear op"):
        GROUP(torch.randn(1, 128), tensors, ints, "w8a8_linear", "fp32")
    with pytest.raises(ValueError, match="in_features"):
        GROUP(torch.randn(1, 64), tensors, ints, name, "fp32")


def _config(fmt: str, nested: bool) -> QuantConfig:
    if fmt == "int4-sym":
        return QuantConfig(format="int4", blocksize=64, symmetric=True)
    if fmt == "int4":
        return QuantConfig(format="int4", blocksize=64)
    return QuantConfig(format=fmt) if fmt == "int8" else QuantConfig(format=fmt, nested=nested)


@pytest.mark.skipif(not VNNI, reason="no AVX512-VNNI")
@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(("nf4", "fp4", "int4", "int4-sym", "int8")),
    mix=st.sampled_from(("same", "nested mix", "int4 mix")),
    widths=st.lists(st.integers(1, 260), min_size=2, max_size=4),
    k=st.sampled_from((128, 384, 896, 1600, 2048)), m=st.integers(1, 5), threads=st.sampled_from((1, 2)),
    bias=st.booleans(),
)  # fmt: skip
def test_property_one_region_equals_the_members_calls(fmt, mix, widths, k, m, threads, bias):
    """At decode sizes the group runs in one region (x quantized once, the members' rows split between
    the threads as one range): every output bit-identical to the member's own call, whatever widths (not
    multiples of the 16-row tiles), long rows (K > 1536), M = 1..5, threads. Members taking different
    activations (int4 with and without zero points) run one by one, same results."""
    cfgs = [_config(fmt, True)] * len(widths)
    if mix == "nested mix" and fmt in ("nf4", "fp4"):
        cfgs = [_config(fmt, i % 2 == 0) for i in range(len(widths))]
    elif mix == "int4 mix" and fmt.startswith("int4"):
        cfgs = [_config("int4" if i % 2 else "int4-sym", True) for i in range(len(widths))]
    layers = [_member(c, n, k, bias and i % 2 == 0, seed=i) for i, (c, n) in enumerate(zip(cfgs, widths, strict=True))]
    tensors, ints = _args(layers)
    fast = ops.fast_kernel(layers[0].op._opname, "cpu")
    x = torch.randn(m, k)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            want = _want(layers, x)
            before = int8_compute._lib().qbi8_group_regions()
            y = fast_path.group_linear(fast, x, tensors, ints, "int8")
            regions = int8_compute._lib().qbi8_group_regions() - before
    finally:
        torch.set_num_threads(old)
    assert y is not None
    _same(y, want)
    assert regions == (0 if mix == "int4 mix" and fmt.startswith("int4") else 1)


@pytest.mark.skipif(not VNNI, reason="no AVX512-VNNI")
def test_from_the_gemm_rows_on_members_run_one_by_one():
    """From the rows where the GEMM kernels take over (6 for 4-bit weights) a group is its members' calls."""
    layers = _group("nf4", "int8", widths=(64, 48), k=256)
    tensors, ints = _args(layers)
    fast = ops.fast_kernel(layers[0].op._opname, "cpu")
    lib = int8_compute._lib()
    for m, regions in ((5, 1), (6, 0), (8, 0)):
        x = torch.randn(m, 256)
        before = lib.qbi8_group_regions()
        with torch.no_grad():
            y = fast_path.group_linear(fast, x, tensors, ints, "int8")
        assert y is not None and lib.qbi8_group_regions() - before == regions
        _same(y, _want(layers, x))


@pytest.mark.skipif(not PACKS16, reason="no AVX512-VNNI")
@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(1, 260), min_size=1, max_size=4),
    k=st.sampled_from((32, 100, 128, 896, 2048, 2100)), m=st.sampled_from((0, 1, 2, 3, 5, 8, 48, 49)),
    threads=st.sampled_from((1, 2)), bias=st.booleans(), special=st.sampled_from((None, "nan", "big")),
)  # fmt: skip
def test_property_int16_packed_group_equals_the_members_calls(widths, k, m, threads, bias, special):
    """int8 weights in int16 compute: up to 48 rows the group is one call on the members' packed copies (x
    quantized once, every member's panels in one region), each output bit-identical to the member's own
    call, whatever widths (not multiples of the 16-column blocks), K (not multiples of 32) and threads.
    No rows, more rows, rows with NaN/Inf and outputs overflowing: declined, and the members' own calls
    give them."""
    layers = [_member(QuantConfig(format="int8"), n, k, bias and i % 2 == 0, seed=i, compute="int16")
              for i, n in enumerate(widths)]  # fmt: skip
    tensors, ints = _args(layers)
    name = layers[0].op._opname
    fast = ops.fast_kernel(name, "cpu")
    x = torch.randn(m, k)
    if special == "nan" and m:
        x[m // 2, k // 3] = math.nan
    elif special == "big" and m:  # finite, and outputs beyond fp32 where the products add up
        x[m // 2] = x[m // 2].clamp(-1, 1) * 3e38
    lib = int16_compute._lib()[0]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            want = _want(layers, x)
            before = lib.qbi16_group_regions()
            y = fast_path.group_linear(fast, x, tensors, ints, "int16")
            regions = lib.qbi16_group_regions() - before
            direct = lg._direct(x, tensors, ints, name, "int16")
    finally:
        torch.set_num_threads(old)
    _same(direct, want)
    if m == 0 or m > 48 or special == "nan":  # no rows: the members' kernels give their empty outputs
        assert y is None and regions == 0
    elif special == "big":  # ran; declined exactly when an output is not finite
        assert regions == 1 and (y is None) == (not bool(want.isfinite().all()))
        if y is not None:
            _same(y, want)
    else:
        assert y is not None and regions == 1
        _same(y, want)


@pytest.mark.skipif(not PACKS16, reason="no AVX512-VNNI")
def test_int16_group_follows_packing_and_weight_changes():
    """Packing switched off: the group declines (the members read the canonical codes). Codes changed in
    place: the group runs on the new packed copies."""
    layers = [_member(QuantConfig(format="int8"), n, 96, True, seed=i, compute="int16") for i, n in enumerate((40, 17))]
    tensors, ints = _args(layers)
    name = layers[0].op._opname
    fast = ops.fast_kernel(name, "cpu")
    x = torch.randn(2, 96)
    with torch.no_grad():
        first = fast_path.group_linear(fast, x, tensors, ints, "int16")
        assert first is not None
        _same(first, _want(layers, x))
        int16_compute.PACKING = False
        try:
            assert fast_path.group_linear(fast, x, tensors, ints, "int16") is None
            _same(lg._direct(x, tensors, ints, name, "int16"), _want(layers, x))
        finally:
            int16_compute.PACKING = True
        layers[1].codes.neg_()
        after = fast_path.group_linear(fast, x, tensors, ints, "int16")
        assert after is not None
        _same(after, _want(layers, x))
        assert torch.equal(after[: 2 * 40], first[: 2 * 40]) and not torch.equal(after[2 * 40 :], first[2 * 40 :])


def test_opcheck():
    """The op's registration (schema, fake, no autograd) as torch.library.opcheck sees it."""
    layers = _group("nf4", "int8" if VNNI else "fp32", widths=(16, 40), k=64)
    tensors, ints = _args(layers)
    torch.library.opcheck(GROUP, (torch.randn(2, 64), tensors, ints, layers[0].op._opname, layers[0].compute))
