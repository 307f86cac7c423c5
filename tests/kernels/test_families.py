"""The op-family descriptions and what is derived from them: schemas, binding, validation, vocabulary."""

from __future__ import annotations

import pytest
import torch

from qbackend.formats import Scheme, quantize
from qbackend.kernels import (
    FAMILIES,
    family_of,
    linear_op,
    ops,
    prepare_weight,
    supported,
)
from qbackend.kernels.families import WEIGHT_FORMATS, by_op_name
from qbackend.kernels.spec import OpFamily

qb = torch.ops.qbackend

SCHEMES = {
    "nf4": Scheme("nf4", nested=True),
    "fp4": Scheme("fp4", blocksize=32),
    "int4": Scheme("int", bits=4, blocksize=32),
    "int8": Scheme("int", bits=8, granularity="channel"),
}


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_one_name_per_format(fmt: str) -> None:
    scheme = SCHEMES[fmt]
    assert scheme.format == fmt
    op = linear_op(scheme)
    assert op is linear_op(fmt) is getattr(qb, f"{fmt}_linear").default
    assert family_of(op).name == fmt
    assert prepare_weight(quantize(torch.randn(8, 64), scheme)).op is op
    assert supported(scheme) == (True, f"{scheme.name}: {fmt}_linear")


def test_nf4_and_fp4_share_one_codebook_description() -> None:
    nf4, fp4 = FAMILIES["nf4"], FAMILIES["fp4"]
    assert nf4.kernel == fp4.kernel == "codebook"
    assert nf4.schema() == fp4.schema() and nf4.weights == fp4.weights
    assert qb.nf4_linear.default is not qb.fp4_linear.default


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_schema_is_derived_from_the_description(family: OpFamily) -> None:
    op = getattr(qb, family.op_name).default
    names = [a.name for a in op._schema.arguments]
    assert tuple(names) == family.arg_names()
    assert str(op._schema) == f"qbackend::{family.op_name}{family.schema()}"
    grad = getattr(qb, family.grad_op_name).default
    assert tuple(a.name for a in grad._schema.arguments)[1:] == (
        *(t.name for t in FAMILIES[family.grad_family or family.name].weights),
        *FAMILIES[family.grad_family or family.name].ints,
    )
    assert ops.GRAD_INPUT_OPS[family.op_name] == family.grad_op_name
    assert by_op_name(family.op_name) == (family, False)


def test_unknown_format_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="nf4, fp4, int4, int8, w8a8, w8a8_outlier"):
        linear_op("fp8")


def test_bind_names_arguments_and_rejects_wrong_arity() -> None:
    fam = FAMILIES["int8"]
    a = fam.bind((1, 2, 3, None, 4, 5))
    assert (a.x, a.codes, a.scale, a.bias, a.out_features, a.in_features) == (1, 2, 3, None, 4, 5)
    assert a.compute == "fp32"  # the schema's default
    assert fam.bind((1, 2, 3), {"bias": None, "out_features": 4, "in_features": 5}) == a
    assert fam.bind((1, 2, 3, None, 4, 5, "int8")).compute == "int8"
    with pytest.raises(TypeError, match=r"qbackend::int8_linear: missing argument\(s\) in_features"):
        fam.bind((1, 2, 3, None, 4))
    with pytest.raises(TypeError, match="takes 7 arguments; got 8"):
        fam.bind((1, 2, 3, None, 4, 5, "fp32", 6))


def _int8_args(n: int = 8, k: int = 64) -> tuple:
    kw = prepare_weight(quantize(torch.randn(n, k), SCHEMES["int8"]))
    return kw.tensors, kw.statics


def test_validation_is_the_same_in_fake_and_real_kernels() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    (codes, scale), (n, k) = _int8_args()
    bad = dict(x=torch.randn(2, k), codes=codes, scale=scale[:-1], bias=None, act_scale=None)
    msg = r"qbackend::w8a8_linear: scale has 7 elements; expected 8"
    with pytest.raises(ValueError, match=msg):
        qb.w8a8_linear(*bad.values(), n, k)
    with FakeTensorMode() as mode:
        fake = [None if t is None else mode.from_tensor(t) for t in bad.values()]
        with pytest.raises(ValueError, match=msg):
            qb.w8a8_linear(*fake, n, k)


def test_outlier_op_validation_comes_from_its_description() -> None:
    (codes, scale), (n, k) = _int8_args()
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match=r"w8a8_outlier_linear: threshold must be > 0; got 0.0"):
        qb.w8a8_outlier_linear(x, codes, scale, None, None, 0.0, n, k)
    with pytest.raises(TypeError, match=r"w8a8_outlier_linear: codes must be int8; got torch.uint8"):
        qb.w8a8_outlier_linear(x, codes.view(torch.uint8), scale, None, None, 6.0, n, k)
    with pytest.raises(ValueError, match=r"w8a8_outlier_linear: act_scale has 2 elements; expected 1"):
        qb.w8a8_outlier_linear(x, codes, scale, None, torch.ones(2), 6.0, n, k)
    with pytest.raises(ValueError, match=r"w8a8_outlier_linear: bias must have shape \[out_features\] = \[8\]"):
        qb.w8a8_outlier_linear(x, codes, scale, torch.ones(1, 8), None, 6.0, n, k)


@pytest.mark.parametrize("name", ["w8a8", "w8a8_outlier"])
def test_w8a8_autograd_uses_int8_grad_input_and_saves_only_the_weight(name: str) -> None:
    (codes, scale), (n, k) = _int8_args()
    w = codes.view(n, k).float() * scale.view(-1, 1)
    x = torch.randn(3, k, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    extra = (torch.tensor([0.05]),) if name == "w8a8" else (None, 6.0)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = linear_op(name)(x, codes, scale, b, *extra, n, k)
    assert {t.data_ptr() for t in saved} <= {codes.data_ptr(), scale.data_ptr()}
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, n) @ w)
    torch.testing.assert_close(b.grad, torch.full((n,), 3.0))


def test_linear_op_of_a_non_format_names_the_type_not_the_value() -> None:
    with pytest.raises(TypeError, match=r"takes a Scheme or a format name; got Tensor$"):
        linear_op(torch.ones(2))
