"""The op families: one :class:`~qbackend.kernels.spec.OpFamily` per format, each written once.

nf4 and fp4 come from one codebook description (same layout; the code table is an argument), so
each keeps its own op name. w8a8 and w8a8_outlier reuse int8's weight tensors and its grad-input op.
"""

from __future__ import annotations

import functools

import torch

from . import reference as ref
from .spec import Args, OpFamily, TensorArg

U8, I8, F32 = (torch.uint8,), (torch.int8,), (torch.float32,)
N_K = ("out_features", "in_features")


def _packed4(a: Args) -> int:
    return (a.out_features * a.in_features + 1) // 2


def _blocks(a: Args) -> int:
    return -(-a.out_features * a.in_features // a.blocksize)


def _groups(a: Args) -> int:
    return -(-a.in_features // a.groupsize)


_NESTED = ("nested_codes", "nested_absmax", "nested_offset", "nested_table")


def _check_codebook(fam: OpFamily, a: Args, grad: bool) -> None:
    """Plain (``absmax``) or nested constants (all four ``nested_*``), never both."""
    nested = [a[n] for n in _NESTED]
    if a.absmax is not None:
        if any(t is not None for t in nested):
            fam.fail("give either absmax (plain constants) or the nested_* tensors, not both", grad)
    elif any(t is None for t in nested):
        missing = [n for n, t in zip(_NESTED, nested, strict=True) if t is None]
        fam.fail(f"absmax is None, so nested constants are needed, but {', '.join(missing)} is None", grad)


_CODEBOOK_WEIGHTS = (
    TensorArg("codes", U8, _packed4),
    TensorArg("absmax", F32, _blocks, optional=True),
    TensorArg("nested_codes", U8, _blocks, optional=True),
    TensorArg("nested_absmax", F32, lambda a: -(-_blocks(a) // a.nested_blocksize), optional=True),
    TensorArg("nested_offset", F32, lambda a: 1, optional=True),
    TensorArg("table", F32, lambda a: 16),  # the format's code table (NF4's or FP4's)
    TensorArg("nested_table", F32, lambda a: 256, optional=True),
)


def _codebook(name: str) -> OpFamily:
    """A 4-bit codebook format: the one description, instantiated per format name."""
    return OpFamily(
        name=name,
        kernel="codebook",
        weights=_CODEBOOK_WEIGHTS,
        ints=(*N_K, "blocksize", "nested_blocksize"),
        check=_check_codebook,
        computes=True,
        summary=f"{name} weight: table[code] * absmax[block], plain or nested (double-quantized) constants",
    )


def _grouped(name: str, dtypes: tuple[torch.dtype, ...], optional: bool = False) -> TensorArg:
    """An int4 per-group constant: [out_features, ceil(in_features/groupsize)]."""
    return TensorArg(name, dtypes, lambda a: a.out_features * _groups(a), optional=optional,
                     shape=lambda a: (a.out_features, _groups(a)),
                     shape_doc="[out_features, ceil(in_features/groupsize)]")  # fmt: skip


NF4 = _codebook("nf4")
FP4 = _codebook("fp4")
INT4 = OpFamily(
    name="int4",
    kernel="int4",
    weights=(
        TensorArg("codes", U8, _packed4),
        _grouped("scale", F32),
        _grouped("zero_point", U8, optional=True),
    ),
    ints=(*N_K, "groupsize"),
    computes=True,
    summary="int4 weight, one scale (and zero point, else 8) per group along K",
)
_INT8_WEIGHTS = (TensorArg("codes", I8, lambda a: a.out_features * a.in_features),
                 TensorArg("scale", F32, lambda a: a.out_features))  # fmt: skip
INT8 = OpFamily(name="int8", kernel="int8", weights=_INT8_WEIGHTS, ints=N_K, computes=True,
                summary="symmetric int8 weight, one scale per output channel")  # fmt: skip
_ACT_SCALE = TensorArg("act_scale", F32, lambda a: 1, optional=True)
W8A8 = OpFamily(
    name="w8a8",
    kernel="w8a8",
    weights=_INT8_WEIGHTS,
    extras=(_ACT_SCALE,),
    ints=N_K,
    grad_family="int8",  # straight-through: the activation rounding is the identity for grad_x
    summary="int8 activations (per token, or static act_scale) x int8 weights -> int32, rescaled",
)


def _check_threshold(fam: OpFamily, a: Args, grad: bool) -> None:
    if not a.threshold > 0:
        fam.fail(f"threshold must be > 0; got {a.threshold}", grad)


def _outlier_default(*args: object) -> torch.Tensor:
    # Composite: the W8A8 op (so each device's W8A8 kernel runs) plus a float matmul over outliers.
    return ref.w8a8_outlier_linear(*args, w8a8=torch.ops.qbackend.w8a8_linear)


W8A8_OUTLIER = OpFamily(
    name="w8a8_outlier",
    kernel="w8a8_outlier",
    weights=_INT8_WEIGHTS,
    extras=(_ACT_SCALE,),
    floats=("threshold",),
    ints=N_K,
    check=_check_threshold,
    grad_family="int8",
    default=_outlier_default,
    summary="w8a8 with the input columns reaching threshold computed in float (LLM.int8() outliers)",
)

#: every family by name (format names first, then the activation schemes)
FAMILIES: dict[str, OpFamily] = {f.name: f for f in (NF4, FP4, INT4, INT8, W8A8, W8A8_OUTLIER)}

#: the weight formats (Scheme.format values) that have a weight-only op
WEIGHT_FORMATS = ("nf4", "fp4", "int4", "int8")


@functools.cache
def by_op_name(op_name: str) -> tuple[OpFamily, bool]:
    """(family, is_grad_op) for an op name such as ``nf4_linear`` or ``int8_linear_grad_input``."""
    for f in FAMILIES.values():
        if op_name == f.op_name:
            return f, False
        if f.has_grad_op and op_name == f.grad_op_name:
            return f, True
    raise KeyError(f"no qbackend op family has an op named {op_name!r}")
