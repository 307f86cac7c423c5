"""`QATQuantizedLinear` <-> its format record, for save and load.

A deployed QAT layer is a weight-only layer that also quantizes its input: its record is of kind
``weight_only`` with the option ``activations`` ("dynamic", or "static" with the tensor
``act_scale``). Records without activation settings are left to the weight-only workflow.
"""

from __future__ import annotations

import torch
from torch import nn

from ...formats import LayerRecord, RecordError
from ..weight_only.records import KIND, record_quantized_linear, shared_kernel_weight
from .deploy import QATQuantizedLinear

#: the option and tensor this workflow adds to weight-only records
RECORD_KINDS = {KIND: (("activations",), ("act_scale",))}


def record_qat_linear(m: nn.Module, name: str) -> LayerRecord | None:
    """The record of a `QATQuantizedLinear` (None for any other module)."""
    if not isinstance(m, QATQuantizedLinear):
        return None
    rec = record_quantized_linear(m, name)
    rec.options["activations"] = m.activations
    if m.activations == "static":
        rec.tensors["act_scale"] = m.act_scale
    return rec


def build_qat_linear(rec: LayerRecord, name: str, kernel_weights: dict) -> QATQuantizedLinear | None:
    """The `QATQuantizedLinear` of a weight-only record with activation settings (None without)."""
    activations = rec.options.get("activations", "none")
    if activations == "none":
        return None
    if activations not in ("dynamic", "static"):
        raise ValueError(f"unknown activations {activations!r}")
    scale = rec.tensors.get("act_scale")
    if (scale is None) == (activations == "static"):
        state = "missing" if scale is None else "set"
        raise ValueError(f"activations {activations!r} with act_scale {state}")
    if scale is not None and (scale.dtype != torch.float32 or scale.numel() != 1):
        raise RecordError(f"QAT layer {name!r}: act_scale must be one float32 value; "
                          f"got {scale.numel()} {str(scale.dtype).removeprefix('torch.')}")  # fmt: skip
    kw = shared_kernel_weight(rec.weight, kernel_weights)
    return QATQuantizedLinear(kw, rec.bias, rec.layer_scheme, activations, scale)
