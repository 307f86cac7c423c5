"""Rebuild a `QuantizedLinear` / `W8A8Linear` from stored tensors and its manifest record (no re-quantization)."""

from __future__ import annotations

from typing import Any

import torch

from ..formats import FormatError, Scheme
from .manifest import CheckpointError

_W8A8_OPS = ("qbackend.w8a8_linear.default", "qbackend.w8a8_outlier_linear.default")


def op_tensor_args(op: torch._ops.OpOverload) -> tuple[str, ...]:
    """Names of the op's weight tensors: the arguments between ``x`` and ``bias``."""
    names = [a.name for a in op._schema.arguments]
    return tuple(names[1 : names.index("bias")])


def build_quantized_linear(
    name: str, rec: dict[str, Any], tensors: dict[str, torch.Tensor], aliases: dict[str, str], path: str
) -> torch.nn.Module:
    import qbackend.kernels  # noqa: F401  (registers torch.ops.qbackend.*)

    from ..kernels import KernelWeight, linear_op, stored_op
    from ..kernels.families import WEIGHT_FORMATS

    if rec.get("kind") == "w8a8":
        return build_w8a8_linear(name, rec, tensors, aliases, path)
    from ..workflows.weight_only.linear import QuantizedLinear

    def get(key: str) -> torch.Tensor | None:
        key = aliases.get(key, key)
        return tensors.get(key)

    try:
        qualname = rec["op"]
        scheme = Scheme(**rec["scheme"])
        try:
            op = stored_op(qualname, scheme)  # today's op names and the legacy ones (codebook4_linear)
        except KeyError:
            why = "which this qbackend does not have"
            raise CheckpointError(f"{path}: layer {name!r} names op {qualname!r}, {why}") from None
        if op not in (linear_op(f) for f in WEIGHT_FORMATS):
            raise CheckpointError(f"{path}: layer {name!r} names op {qualname!r}, which is not a weight-only op")
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


def build_w8a8_linear(
    name: str, rec: dict[str, Any], tensors: dict[str, torch.Tensor], aliases: dict[str, str], path: str
) -> torch.nn.Module:
    """A `W8A8Linear` from its stored codes, scales, activation scale and smoothing multiply."""
    from ..workflows.w8a8.linear import W8A8Linear

    def get(key: str) -> torch.Tensor | None:
        return tensors.get(aliases.get(f"{name}.{key}", f"{name}.{key}"))

    try:
        if rec["op"] not in _W8A8_OPS:
            raise CheckpointError(f"{path}: layer {name!r} names op {rec['op']!r}, which this qbackend does not have")
        outlier = rec["op"] == _W8A8_OPS[1]
        threshold = rec["outlier_threshold"]
        if outlier != (threshold is not None):
            raise ValueError(f"op {rec['op']} with outlier_threshold {threshold!r}")
        wanted = {"codes": True, "scale": True, "act_scale": rec["activation"] == "tensor", "smooth": rec["smooth"],
                  "bias": rec["bias"]}  # fmt: skip
        got = {key: get(key) for key in wanted}
        missing = [f"{name}.{k}" for k, want in wanted.items() if want and got[k] is None]
        if missing:
            raise CheckpointError(f"{path}: W8A8 layer {name!r} is missing {', '.join(missing)}")
        layer = W8A8Linear(
            got["codes"], got["scale"], got["bias"], out_features=int(rec["out_features"]),
            in_features=int(rec["in_features"]), act_scale=got["act_scale"], threshold=threshold,
            smooth=got["smooth"], smoothing=str(rec.get("smoothing", "")),
        )  # fmt: skip
    except (KeyError, ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: corrupt record for W8A8 layer {name!r} ({type(e).__name__}: {e})") from None
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
