"""The ops reject, before any kernel runs, every argument that would make a kernel read out of
bounds: a required tensor given as None (also the conditionally required ones), a wrong dtype,
element count or device, non-positive sizes. And int8/int4/W8A8 stay finite where fp32 is."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.formats import Scheme, quantize
from qbackend.kernels import FAMILIES, family_of, prepare_weight, quantized_linear
from qbackend.kernels import reference as ref
from qbackend.kernels.cpu import finite
from qbackend.passes.weight_cache import dequantize_kernel_weight

torch.manual_seed(0)
W = torch.randn(48, 64) * 0.05
SCHEMES = {
    "nf4-nested": Scheme("nf4", 4, blocksize=64, nested=True),
    "fp4-plain": Scheme("fp4", 4, blocksize=64, nested=False),
    "int4-affine": Scheme("int", 4, symmetric=False, granularity="block", blocksize=32),
    "int4-sym": Scheme("int", 4, symmetric=True, granularity="block", blocksize=32),
    "int8": Scheme("int", 8, symmetric=True, granularity="channel", axis=0),
}
KW = {k: prepare_weight(quantize(W, s)) for k, s in SCHEMES.items()}
X = torch.randn(3, 64)


def _call(kw, tensors, statics=None, x=X, grad=False):
    fam = family_of(kw.op)
    if grad:
        op = getattr(torch.ops.qbackend, fam.grad_op_name).default
        return op(torch.randn(3, kw.out_features), *tensors, *(statics or kw.statics))
    return kw.op(x, *tensors, None, *(statics or kw.statics))


def _required(kw) -> list[bool]:
    """Per weight tensor: does the layer's own call need it (present in a valid call)?"""
    return [t is not None for t in kw.tensors]


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad_input"])
@pytest.mark.parametrize("key", list(KW))
def test_dropping_any_present_tensor_is_refused(key, grad):
    kw = KW[key]
    present = [i for i, t in enumerate(kw.tensors) if t is not None]
    fam = family_of(kw.op)
    optional = {t.name for t in fam.weights if t.optional}
    for r in range(1, len(present) + 1):
        for drop in itertools.combinations(present, r):
            tensors = [None if i in drop else t for i, t in enumerate(kw.tensors)]
            names = {kw.names[i] for i in drop}
            if names <= optional and not (names & {"absmax", "nested_codes", "nested_absmax", "nested_offset",
                                                   "nested_table"}):  # fmt: skip
                continue  # e.g. int4's zero_point: dropping it is a valid (symmetric) call
            with pytest.raises((TypeError, ValueError), match=r"qbackend::\w+: .*(required|is None|needed)"):
                _call(kw, tensors, grad=grad)


def test_codebook_needs_plain_or_nested_constants_exactly():
    plain, nested = KW["fp4-plain"], KW["nf4-nested"]
    both = list(plain.tensors)
    both[2:5], both[6] = nested.tensors[2:5], nested.tensors[6]
    with pytest.raises(ValueError, match="give either absmax .plain constants. or the nested_\\* tensors, not both"):
        _call(plain, both)
    neither = [None if i in (1, 2, 3, 4, 6) else t for i, t in enumerate(nested.tensors)]
    with pytest.raises(ValueError, match="absmax is None, so nested constants are needed, but nested_codes"):
        _call(nested, neither)


@settings(max_examples=60)
@given(key=st.sampled_from(list(KW)), which=st.integers(0, 6), change=st.sampled_from(["dtype", "short", "long"]))
def test_a_tensor_of_the_wrong_dtype_or_size_is_refused(key, which, change):
    kw = KW[key]
    present = [i for i, t in enumerate(kw.tensors) if t is not None]
    i = present[which % len(present)]
    t = kw.tensors[i]
    if change == "dtype":
        bad = t.to(torch.int16) if t.dtype != torch.int16 else t.float()
        fragment = "must be"
    else:
        flat = t.reshape(-1)
        bad = flat[:-1] if change == "short" and t.numel() > 1 else torch.cat([flat, flat[:1]])
        fragment = "elements; expected|must have shape"
    tensors = list(kw.tensors)
    tensors[i] = bad
    with pytest.raises((TypeError, ValueError), match=fragment):
        _call(kw, tensors)


@pytest.mark.parametrize("key", list(KW))
def test_sizes_that_do_not_fit_the_tensors_are_refused(key):
    kw = KW[key]
    n, k, *rest = kw.statics
    variants = [(n * 2, k, *rest), (n, k, *[0 for _ in rest]), (-1, k, *rest), (n, k, *[2**40 for _ in rest])]
    for statics in [v for v in variants if v != tuple(kw.statics)]:
        with pytest.raises(ValueError, match=r"qbackend::\w+: "):
            _call(kw, kw.tensors, statics)


def test_x_of_the_wrong_width_dtype_or_rank_is_refused():
    kw = KW["nf4-nested"]
    with pytest.raises(ValueError, match="x has last dimension 63 but in_features=64"):
        _call(kw, kw.tensors, x=torch.randn(3, 63))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16; got torch.int64"):
        _call(kw, kw.tensors, x=torch.ones(3, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        _call(kw, kw.tensors, x=torch.tensor(1.0))


def test_every_family_is_covered():
    assert {family_of(kw.op).name for kw in KW.values()} | {"w8a8", "w8a8_outlier"} == set(FAMILIES)


# ---- finite where fp32 is ----------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 8, 200], ids=["gemv", "small-m", "panel"])
@pytest.mark.parametrize("key", ["nf4-nested", "int4-affine", "int8"])
@pytest.mark.parametrize("magnitude", [1e36, 1e37])
def test_outputs_are_finite_where_fp32_is(key, rows, magnitude):
    kw = KW[key]
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)) * magnitude
    bias = torch.randn(48)
    expected = torch.nn.functional.linear(x, dequantize_kernel_weight(kw), bias)
    assert torch.isfinite(expected).all()
    got = kw.op(x, *kw.tensors, bias, *kw.statics)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=magnitude * 1e-6)


@pytest.mark.parametrize("act_scale", [None, "static"])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_w8a8_is_finite_where_fp32_is(impl, act_scale):
    kw = KW["int8"]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 1e36
    s = None if act_scale is None else (x.abs().amax() / 127).reshape(())
    fn = torch.ops.qbackend.w8a8_linear if impl == "op" else ref.w8a8_linear
    got = fn(x, *kw.tensors, None, s, *kw.statics)
    expected = torch.nn.functional.linear(x, dequantize_kernel_weight(kw))
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()
    assert float(((got - expected) / 1e36).norm() / (expected / 1e36).norm()) < 0.05  # int8 activations: ~1e-2


def test_the_finite_retry_keeps_a_genuinely_infinite_output():
    kw = KW["int8"]
    x = torch.full((1, 64), float("inf"))
    assert not torch.isfinite(quantized_linear(x, kw)).all()
    assert set(finite.POSITIONS) >= {"codebook_linear", "int4_linear", "int8_linear", "w8a8_linear"}
