"""Rebuild a `QuantizedLinear` from stored tensors and its manifest record (no re-quantization)."""

from __future__ import annotations

from typing import Any

import torch

from ..formats import FormatError, Scheme
from .manifest import CheckpointError

# The ops a stored layer may name (a manifest must not make us call an arbitrary operator).
_OPS = ("codebook4_linear", "int4_linear", "int8_linear")


def op_tensor_args(op: torch._ops.OpOverload) -> tuple[str, ...]:
    """Names of the op's weight tensors: the arguments between ``x`` and ``bias``."""
    names = [a.name for a in op._schema.arguments]
    return tuple(names[1 : names.index("bias")])


def build_quantized_linear(
    name: str, rec: dict[str, Any], tensors: dict[str, torch.Tensor], aliases: dict[str, str], path: str
) -> torch.nn.Module:
    import qbackend.kernels  # noqa: F401  (registers torch.ops.qbackend.*)

    from ..kernels import KernelWeight
    from ..quantize_module import QuantizedLinear

    def get(key: str) -> torch.Tensor | None:
        key = aliases.get(key, key)
        return tensors.get(key)

    try:
        qualname = rec["op"]
        ns, op_name, overload = qualname.split(".")
        if ns != "qbackend" or op_name not in _OPS:
            raise CheckpointError(f"{path}: layer {name!r} names op {qualname!r}, which this qbackend does not have")
        op = getattr(getattr(torch.ops.qbackend, op_name), overload)
        scheme = Scheme(**rec["scheme"])
        statics = tuple(int(s) for s in rec["statics"])
        arg_names = op_tensor_args(op)
        args = tuple(get(f"{name}.{a}") for a in arg_names)
        bias = get(f"{name}.bias")
        if rec["bias"] and bias is None:
            raise CheckpointError(f"{path}: layer {name!r} has a bias but {name}.bias is missing")
    except (KeyError, ValueError, TypeError, AttributeError, FormatError) as e:
        if isinstance(e, CheckpointError):
            raise
        why = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: corrupt record for quantized layer {name!r} ({why})") from None
    layer = QuantizedLinear(KernelWeight(op, args, statics, arg_names), bias, scheme)
    _check_shapes(layer, name, path)
    return layer


def _check_shapes(layer: torch.nn.Module, name: str, path: str) -> None:
    """Run the op's own argument checks on a fake input, so a bad file fails at load, not at first call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            layer(torch.empty(1, layer.in_features))
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: quantized layer {name!r} does not fit its record: {e}") from None
