"""Compiled code calls the CPU kernels directly, not through ``torch.ops`` (the dispatcher round trip).

Inductor emits ``torch.ops.qbackend.<op>.default(...)`` for our ops: the dispatcher, custom_op's
Python autograd layer and the registered kernel's argument binding and validation cost ~15-20 us of
a ~25 us call on a small layer (MiniLM has 37 linears per call). Inductor's generated code runs
below autograd (AOTAutograd handles gradients around it; inside, every op runs without grad) and
its arguments were validated by the op's fake at trace time (sizes and strides are asserted at
run time), so there the kernel itself can be called: :func:`install` registers a custom Python
codegen with Inductor (``CUSTOM_EXTERN_KERNEL_CODEGEN``) that writes ``KERNELS["<op>"](...)`` for
ops on CPU, and leaves everything else (other devices, the C++ wrapper) to Inductor's default.

Compiled code loaded from Inductor's cache imports this module: :data:`KERNELS` gives the op
itself for any op without a direct CPU kernel, so such code is always correct. Inductor's cache key
does not see the codegen hook, so :func:`cache_key_pass` gives the backend a no-op post-grad pass
whose ``uuid`` marks graphs compiled with it (code cached before, with dispatcher calls, is not
reused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import ops
from .families import FAMILIES
from .spec import NAMESPACE

_OP_NAMES: tuple[str, ...] = tuple(
    sorted({f.op_name for f in FAMILIES.values()} | {f.grad_op_name for f in FAMILIES.values() if f.has_grad_op})
)
_IMPORT = "from qbackend.kernels.direct import KERNELS as _qbackend_kernels"


class _Kernels(dict):
    """op name -> the callable compiled code runs: the direct CPU kernel, else the op."""

    def __missing__(self, op_name: str) -> Callable[..., torch.Tensor]:
        fn = ops.direct_kernel(op_name, "cpu") or getattr(getattr(torch.ops, NAMESPACE), op_name).default
        self[op_name] = fn
        return fn


KERNELS: dict[str, Callable[..., torch.Tensor]] = _Kernels()
_installed = False


def install() -> None:
    """Make Inductor's Python wrapper call our CPU kernels directly (idempotent; loads Inductor)."""
    global _installed
    if _installed:
        return
    for name in _OP_NAMES:
        if ops.direct_kernel(name, "cpu") is not None:
            install_op(name)
    _installed = True


def install_op(op_name: str) -> None:
    """Make compiled code call op ``op_name``'s direct CPU kernel (registered in ``ops._DIRECT`` by the
    op's own module) without the dispatcher (idempotent; loads Inductor)."""
    try:
        from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN, CustomCodegen
    except ImportError:  # a torch without the hook: compiled code calls the op (correct, slower)
        return
    key = f"torch.ops.{NAMESPACE}.{op_name}.default"
    if key not in CUSTOM_EXTERN_KERNEL_CODEGEN:
        CUSTOM_EXTERN_KERNEL_CODEGEN[key] = CustomCodegen(python=_codegen(op_name))


#: changes whenever the code written by :func:`_codegen` changes (part of Inductor's cache key)
CODEGEN_VERSION = "qbackend-direct-cpu-kernels-1"


def cache_key_pass() -> Any:
    """A post-grad custom pass that changes nothing and keys Inductor's cache on :data:`CODEGEN_VERSION`."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class _DirectCallsKey(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            return None

        def uuid(self) -> str:
            return CODEGEN_VERSION

    return _DirectCallsKey()


def _codegen(op_name: str) -> Callable[[Any, Callable[[str], None]], None]:
    def codegen(node: Any, writeline: Callable[[str], None]) -> None:
        from torch._inductor.codegen.wrapper import ExternKernelAllocLine
        from torch._inductor.virtualized import V

        wrapper = V.graph.wrapper_code
        device = node.get_device()
        if device is None or device.type != "cpu":  # Inductor's default line: the op through the dispatcher
            writeline(ExternKernelAllocLine(wrapper, node))
            return
        if not getattr(wrapper, "_qbackend_direct_import", False):
            wrapper.add_import_once(_IMPORT)
            wrapper._qbackend_direct_import = True
        args = ", ".join([*node.codegen_args(), *node.codegen_kwargs()])
        writeline(f"{node.get_name()} = _qbackend_kernels[{op_name!r}]({args})")

    return codegen


# ---- eager calls (module forwards) -------------------------------------------------------------


def _dispatch_needed(x: object, bias: torch.Tensor | None) -> bool:
    """Whether a call must go through the dispatcher: autograd, tracing, subclasses, modes, transforms."""
    if type(x) is not _TENSOR or not x.is_cpu or x.is_nested or x.layout is not _STRIDED:
        return True
    if _grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return True
    return bool(
        _function_mode_enabled() or _dispatch_stack_len() or _functorch_active() or _compiling() or _tracing()
    )


# bound once: this check runs on every eager quantized call (attribute lookups cost ~0.2 us of ~0.8)
_TENSOR, _STRIDED = torch.Tensor, torch.strided
_grad_enabled = torch.is_grad_enabled
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_compiling = torch.compiler.is_compiling
_tracing = torch.jit.is_tracing


def call(op: torch._ops.OpOverload, args: tuple[Any, ...], bias_at: int) -> torch.Tensor:
    """``op(*args)`` (all positional, schema order; ``args[bias_at]`` the bias), with the CPU kernel
    called directly (validated, no dispatch) when nothing needs the dispatcher: no grad to record,
    a plain CPU tensor, no tracing, mode or functorch transform active. Same result either way."""
    if torch.compiler.is_compiling():  # first: Dynamo folds it, and must not trace the checks below
        return op(*args)
    name = op._opname
    fn = ops.direct_kernel(name, "cpu")
    if fn is None or _dispatch_needed(args[0], args[bias_at]):
        return op(*args)
    family = FAMILIES_BY_OP[name]
    family.validate(family.bind(args))
    return fn(*args)


#: forward op name -> its family
FAMILIES_BY_OP = {f.op_name: f for f in FAMILIES.values()}


def call_linear(
    op: torch._ops.OpOverload, x: torch.Tensor, tensors: Sequence[torch.Tensor | None],
    bias: torch.Tensor | None, statics: tuple[int, ...], compute: str,
) -> torch.Tensor:  # fmt: skip
    """``op(x, *tensors, bias, *statics, compute)`` for a weight-only op, as :func:`call`, through the
    CPU kernel's prepared form (``ops.fast_kernel``) where it takes the call. Same result either way."""
    if not torch.compiler.is_compiling():  # first: Dynamo folds it, and must not trace the rest
        fast = ops.fast_kernel(op._opname, "cpu")
        if fast is not None and not _dispatch_needed(x, bias):
            y = fast.linear(x, tensors, bias, statics, compute)  # type: ignore[attr-defined]
            if y is not None:
                return y
    return call(op, (x, *tensors, bias, *statics, compute), 1 + len(tensors))


def call_args_fast(op: torch._ops.OpOverload, args: tuple[Any, ...], bias_at: int) -> torch.Tensor:
    """:func:`call`, first trying the CPU kernel's fast form on the positional arguments (its
    ``linear_args``: None where it does not take the call). Same result either way."""
    if not torch.compiler.is_compiling():  # first: Dynamo folds it, and must not trace the rest
        fast = ops.fast_kernel(op._opname, "cpu")
        run = getattr(fast, "linear_args", None)
        if run is not None and not _dispatch_needed(args[0], args[bias_at]):
            y = run(*args)
            if y is not None:
                return y
    return call(op, args, bias_at)
