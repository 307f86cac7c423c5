"""`QuantizedLinear` <-> its format record (kind ``weight_only``), for save and load.

The record holds the weight in the canonical `QuantizedWeight` layout (the kernel's tensors turned
back by :func:`~qbackend.kernels.weight_from_kernel_tensors`); building a layer picks the kernel
again with ``prepare_weight``, so a checkpoint never depends on an op's name or signature.
"""

from __future__ import annotations

import json

from torch import nn

from ...formats import LayerRecord, QuantizedWeight, RecordError
from ...kernels import KernelWeight, prepare_weight, weight_from_kernel_tensors
from .linear import QuantizedLinear

KIND = "weight_only"
#: option and tensor names of this kind's records; the QAT workflow adds its activation settings
RECORD_KINDS = {KIND: ((), ("input_scale",))}


def record_quantized_linear(m: nn.Module, name: str) -> LayerRecord | None:
    """The record of a `QuantizedLinear` (None for any other module)."""
    if not isinstance(m, QuantizedLinear):
        return None
    # the buffers are the kernel tensors under the op families' names
    buffers = dict(m.named_buffers(recurse=False))
    qw = weight_from_kernel_tensors(m.scheme, m.out_features, m.in_features, buffers.get, name)
    tensors = {"input_scale": m.input_scale} if m.input_scale is not None else {}
    return LayerRecord(KIND, qw, m.bias, m.scheme, tensors=tensors)


def build_quantized_linear(rec: LayerRecord, name: str, kernel_weights: dict) -> QuantizedLinear | None:
    """The `QuantizedLinear` of a ``weight_only`` record; None when it quantizes activations too (QAT's)."""
    if rec.options.get("activations", "none") != "none":
        return None
    scale = rec.tensors.get("input_scale")
    if scale is not None and (scale.dim() != 1 or scale.numel() != rec.weight.shape[1]):
        raise RecordError(
            f"layer {name!r}: input_scale has shape {tuple(scale.shape)}, expected ({rec.weight.shape[1]},)"
        )
    return QuantizedLinear(shared_kernel_weight(rec.weight, kernel_weights), rec.bias, rec.layer_scheme,
                           input_scale=scale)  # fmt: skip


def shared_kernel_weight(qw: QuantizedWeight, kernel_weights: dict) -> KernelWeight:
    """``prepare_weight(qw)``, once per stored weight: layers tied in the file share their kernel tensors."""
    key = (qw.codes.data_ptr(), json.dumps(qw.scheme.as_dict(), sort_keys=True), qw.shape)
    kw = kernel_weights.get(key)
    if kw is None:
        kw = kernel_weights[key] = prepare_weight(qw)
    return kw
