"""``torch.ops.qbackend.*``: every op registered from its :mod:`~qbackend.kernels.families` description.

Per family ``f`` (see :class:`~qbackend.kernels.spec.OpFamily`):

* ``qbackend::<f>_linear``: schema from the description; default kernel (any device) = the
  reference (or the family's composite default); fake = validation + output shape; autograd = grad
  to ``x`` through the grad-input op (only the quantized weight tensors are saved, never a float
  weight) and to ``bias``; the weights (and ``act_scale``) are frozen.
* ``qbackend::<f>_linear_grad_input`` (families without ``grad_family``): ``grad_x = grad_y @ W``.

Device kernels are added with :func:`register_kernels` (``torch.library.register_kernel``):
:mod:`qbackend.kernels.cpu` for ``"cpu"``, :mod:`qbackend.kernels.cuda` for ``"cuda"``. Every kernel,
default or device, runs behind the same validation, so errors name the bad argument on any device
and at trace time.

Compiled code and ``no_grad`` module forwards may skip the dispatcher: :func:`direct_kernel` is a
device kernel without the dispatch round trip (custom_op's Python autograd layer, argument binding,
validation: ~15-20 us of a ~25 us call on a small layer). It is only for callers below autograd whose
arguments were already validated (Inductor's generated code: the fake ran at trace time) or that
check their own (see :mod:`qbackend.kernels.direct`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import reference as ref
from .families import FAMILIES
from .spec import NAMESPACE, OpFamily

#: forward op name -> the grad-input op that computes its grad_x
GRAD_INPUT_OPS = {f.op_name: f.grad_op_name for f in FAMILIES.values()}


def _fresh(out: Tensor, *inputs: Tensor | None) -> Tensor:
    # custom_op outputs must not alias inputs (the reference can return x itself for a no-op cast).
    if any(t is not None and out.data_ptr() == t.data_ptr() and out.numel() for t in inputs):
        return out.clone()
    return out


def checked(family: OpFamily, fn: Callable[..., Tensor], grad: bool = False) -> Callable[..., Tensor]:
    """``fn`` behind the family's validation (the form in which every kernel is registered)."""

    def kernel(*args: object, **kwargs: object) -> Tensor:
        a = family.bind(args, kwargs, grad)
        family.validate(a, grad)
        return _fresh(fn(*a.values()), a["grad_y" if grad else "x"])

    kernel.__name__ = f"{family.name}_{getattr(fn, '__name__', 'kernel')}"
    return kernel


def _fake(family: OpFamily, grad: bool) -> Callable[..., Tensor]:
    def fake(*args: object, **kwargs: object) -> Tensor:
        a = family.bind(args, kwargs, grad)
        family.validate(a, grad)
        x = a["grad_y" if grad else "x"]
        return x.new_empty(family.out_shape(a, grad))

    return fake


def _autograd(family: OpFamily) -> tuple[Callable, Callable]:
    """(backward, setup_context): grad_x via the grad-input op, grad_bias = sum of grad_y."""
    served = FAMILIES[family.grad_family or family.name]
    n_args = len(family.arg_names())
    bias_at = family.arg_names().index("bias")

    def setup_context(ctx, inputs, output) -> None:
        a = family.bind(inputs)
        ctx.save_for_backward(*(a[t.name] for t in served.weights))
        ctx.ints = tuple(a[i] for i in served.ints)
        ctx.bias_needs_grad = a.bias is not None and a.bias.requires_grad
        ctx.bias_dtype = None if a.bias is None else a.bias.dtype
        ctx.x_dtype = a.x.dtype

    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        grads: list[Tensor | None] = [None] * n_args
        if ctx.needs_input_grad[0]:
            gx = getattr(torch.ops.qbackend, served.grad_op_name)(grad_y, *ctx.saved_tensors, *ctx.ints)
            grads[0] = gx.to(ctx.x_dtype)
        if ctx.bias_needs_grad:
            grads[bias_at] = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return tuple(grads)

    return backward, setup_context


def _define(family: OpFamily, grad: bool) -> torch.library.CustomOpDef:
    name = family.grad_op_name if grad else family.op_name
    default = getattr(ref, f"{family.kernel}_linear_grad_input") if grad else (
        family.default or getattr(ref, f"{family.kernel}_linear"))  # fmt: skip
    kernel = checked(family, default, grad)
    kernel.__doc__ = f"grad_x = grad_y @ W for the {family.name} op" if grad else family.summary
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", kernel, mutates_args=(), schema=family.schema(grad))
    op.register_fake(_fake(family, grad))
    return op


def _register_all() -> dict[str, torch.library.CustomOpDef]:
    defs: dict[str, torch.library.CustomOpDef] = {}
    for f in FAMILIES.values():
        if f.has_grad_op:
            defs[f.grad_op_name] = _define(f, grad=True)
    for f in FAMILIES.values():
        op = defs[f.op_name] = _define(f, grad=False)
        backward, setup = _autograd(f)
        op.register_autograd(backward, setup_context=setup)
    return defs


#: op name -> its CustomOpDef (for ``register_kernel``)
OP_DEFS = _register_all()


#: (op name, device type) -> the registered device kernel without validation (see :func:`direct_kernel`)
_DIRECT: dict[tuple[str, str], Callable[..., Tensor]] = {}


def direct_kernel(op_name: str, device: str) -> Callable[..., Tensor] | None:
    """The ``device`` kernel of op ``op_name`` called directly (positional arguments in schema order,
    ``compute`` by keyword too), or None where that device has no kernel of its own for it.

    No dispatch, no autograd, no validation: the caller must be below autograd (or need no grad) and
    pass arguments the op's validation accepts.
    """
    return _FAST.get((op_name, device)) or _DIRECT.get((op_name, device))


def _direct(family: OpFamily, fn: Callable[..., Tensor], grad: bool) -> Callable[..., Tensor]:
    """``fn`` called with the op's arguments (keywords allowed, as Inductor passes ``compute``), its
    output never an alias of the input (compiled code may write into it)."""

    def kernel(*args: object, **kwargs: object) -> Tensor:
        if kwargs:
            args = tuple(family.bind(args, kwargs, grad).values())
        return _fresh(fn(*args), args[0])  # type: ignore[arg-type]

    kernel.__name__ = f"{family.name}_direct_{getattr(fn, '__name__', 'kernel')}"
    return kernel


def register_kernels(device: str, find: Callable[[str], Callable[..., Tensor] | None]) -> None:
    """Register ``find("<kernel>_linear")`` / ``find("<kernel>_linear_grad_input")`` as the ``device``
    kernels of every family whose implementation ``find`` returns (None: keep the default there)."""
    for f in FAMILIES.values():
        if f.default is not None:  # a composite: runs the device kernels of the ops it calls
            continue
        targets = [(f.op_name, f"{f.kernel}_linear", False)]
        if f.has_grad_op:
            targets.append((f.grad_op_name, f"{f.kernel}_linear_grad_input", True))
        for op_name, fn_name, grad in targets:
            fn = find(fn_name)
            if fn is not None:
                torch.library.register_kernel(OP_DEFS[op_name], device, checked(f, fn, grad))
                _DIRECT[(op_name, device)] = _direct(f, fn, grad)


#: (op name, device type) -> a faster form of its direct kernel (see :func:`register_fast_kernels`)
_FAST: dict[tuple[str, str], Callable[..., Tensor]] = {}


def register_fast_kernels(
    device: str, find: Callable[[str, Callable[..., Tensor]], Callable[..., Tensor] | None]
) -> None:
    """For each op with a ``device`` direct kernel, ``find(op_name, direct)``: a faster form of it (same
    arguments, bit-identical results; it may run ``direct`` itself for cases it does not take), or None.
    :func:`direct_kernel` then returns it; callers may also reach it with :func:`fast_kernel`."""
    for (op_name, dev), direct in list(_DIRECT.items()):
        if dev == device:
            fast = find(op_name, direct)
            if fast is not None:
                _FAST[(op_name, device)] = fast


def fast_kernel(op_name: str, device: str) -> Callable[..., Tensor] | None:
    """The fast form of op ``op_name``'s ``device`` kernel registered by :func:`register_fast_kernels`, or None."""
    return _FAST.get((op_name, device))
