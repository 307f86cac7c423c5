"""``qbackend::linear_group``: several weight-only linears of one op family that read the same input.

``linear_group(x, tensors, ints, op, compute)`` computes, for each member ``i``, what
``torch.ops.qbackend.<op>(x, *weights_i, bias_i, *ints_i, compute)`` computes, and returns the members'
outputs flattened and one after another in one 1-D tensor: member ``i`` is the ``M * n_i`` elements
from ``M * (n_0 + ... + n_{i-1})`` (``M`` = the rows of x), its ``[..., n_i]`` output in row-major order,
so a view of it has the single op's shape and strides. ``tensors`` holds each member's weight tensors
then its bias (None allowed); ``ints`` each member's ints (the family's, out_features first).

Why: at LLM decode a layer's q/k/v (and gate/up) projections read one input, and the Python and the
thread-pool hand-off around each kernel call cost about as much as a small kernel; compiled code calls
one CPU kernel for the group (:func:`.cpu.fast_path.group_linear`: one C call that quantizes x once and
runs all the members' rows in one thread-pool region at decode sizes; the int8 compute mode's kernels and
the int16 mode's packed ones), where results are those of the separate calls bit for bit. The default
kernel (every device) runs the member ops. No autograd: the pass that inserts it
(:mod:`qbackend.passes.group_linears`) does so only where no gradient flows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import ops
from .families import FAMILIES
from .spec import NAMESPACE, OpFamily

__all__ = ["OP_NAME", "has_cpu_group_kernel", "install_direct", "linear_group", "members"]

OP_NAME = "linear_group"
_BY_OP = {f.op_name: f for f in FAMILIES.values()}


def _family(op: str) -> OpFamily:
    f = _BY_OP.get(op)
    if f is None or not f.computes or f.extras or f.floats:
        raise ValueError(f"{NAMESPACE}::{OP_NAME}: op must name a weight-only linear op (e.g. nf4_linear); got {op!r}")
    return f


def members(op: str, tensors: Sequence[Tensor | None], ints: Sequence[int]) -> list[tuple[tuple, Tensor | None, tuple]]:
    """Each member's (weight tensors, bias, ints); raises ValueError when the lists do not split into members."""
    f = _family(op)
    nw, ni = len(f.weights), len(f.ints)
    count = len(tensors) // (nw + 1)
    if count == 0 or len(tensors) != count * (nw + 1) or len(ints) != count * ni:
        raise ValueError(
            f"{NAMESPACE}::{OP_NAME}: {len(tensors)} tensors and {len(ints)} ints do not make whole members of "
            f"{op} ({nw} weight tensors and a bias, {ni} ints each)"
        )
    out = []
    for i in range(count):
        at = i * (nw + 1)
        out.append((tuple(tensors[at : at + nw]), tensors[at + nw], tuple(ints[i * ni : (i + 1) * ni])))
    return out


def _check(x: Tensor, tensors: Sequence[Tensor | None], ints: Sequence[int], op: str, compute: str) -> None:
    f = _family(op)
    for ws, b, st in members(op, tensors, ints):
        f.validate(f.bind((x, *ws, b, *st, compute)))


@torch.library.custom_op(
    f"{NAMESPACE}::{OP_NAME}",
    mutates_args=(),
    schema="(Tensor x, Tensor?[] tensors, SymInt[] ints, str op, str compute) -> Tensor",
)
def linear_group(x: Tensor, tensors: Sequence[Tensor | None], ints: Sequence[int], op: str, compute: str) -> Tensor:
    """The member ops' outputs, flattened, one after another (see the module docstring)."""
    _check(x, tensors, ints, op, compute)
    return _each(getattr(getattr(torch.ops, NAMESPACE), op).default, x, tensors, ints, op, compute)


def _each(fn: Callable[..., Tensor], x: Tensor, tensors: Sequence[Tensor | None], ints: Sequence[int], op: str,
          compute: str) -> Tensor:  # fmt: skip
    """The members' outputs by ``fn`` (a member op's kernel), flattened, one after another."""
    return torch.cat([fn(x, *ws, b, *st, compute).reshape(-1) for ws, b, st in members(op, tensors, ints)])


@linear_group.register_fake
def _(x: Tensor, tensors: Sequence[Tensor | None], ints: Sequence[int], op: str, compute: str) -> Tensor:
    _check(x, tensors, ints, op, compute)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(rows * sum(st[0] for _, _, st in members(op, tensors, ints)))


def _direct(x: Tensor, tensors: Sequence[Tensor | None], ints: Sequence[int], op: str, compute: str) -> Tensor:
    # Compiled code: the fake checked the arguments at trace time.
    fast = ops.fast_kernel(op, "cpu")
    if fast is not None and hasattr(fast, "family"):
        y = _group_call()(fast, x, tensors, ints, compute)
        if y is not None:
            return y
    return _each(ops.direct_kernel(op, "cpu") or getattr(getattr(torch.ops, NAMESPACE), op).default, x, tensors, ints,
                 op, compute)  # fmt: skip


@functools.cache
def _group_call() -> Callable[..., Tensor | None]:
    from .cpu.fast_path import group_linear  # once: an import statement per call costs ~1 us

    return group_linear


def has_cpu_group_kernel(op: str, ints: Sequence[int], compute: str) -> bool:
    """Whether a member of ``op`` with these ints and ``compute`` runs in the CPU group call here (the int8
    compute mode's kernels, the int16 mode's packed ones, on a CPU and shape they cover). Elsewhere a
    group costs a copy per member."""
    from .cpu import _build, int8_compute, int16_compute

    f = _BY_OP.get(op)
    if f is None or compute not in ("int8", "int16") or _build.disabled() or ops.fast_kernel(op, "cpu") is None:
        return False
    named = dict(zip(f.ints, ints, strict=True))
    if compute == "int16":
        return int16_compute.packs() and int16_compute.has_fast_kernel(f.name, named)
    return int8_compute.has_fast_kernel(f.name, named)


# what compiled code runs for the op on CPU (qbackend.kernels.direct.KERNELS looks it up here)
ops._DIRECT[(OP_NAME, "cpu")] = _direct


def install_direct() -> None:
    """Make compiled code call the CPU kernel without the dispatcher (idempotent; loads Inductor)."""
    from . import direct

    direct.install_op(OP_NAME)
