"""`W8A8Linear` <-> its format record (kind ``w8a8``), for save and load.

The weight is int8, symmetric, one scale per output channel (`W8A8_SCHEME`). Options:
``activation`` ("token", or "tensor" with the static scale ``act_scale``), ``outlier_threshold``,
``smoothing`` (a description); tensor ``smooth``: the explicit input multiply 1/s when it was not folded.
"""

from __future__ import annotations

import torch
from torch import nn

from ...formats import LayerRecord, QuantizedWeight, RecordError
from .linear import W8A8Linear
from .lower import W8A8_SCHEME

KIND = "w8a8"
RECORD_KINDS = {KIND: (("activation", "outlier_threshold", "smoothing"), ("act_scale", "smooth"))}


def record_w8a8_linear(m: nn.Module, name: str) -> LayerRecord | None:
    """The record of a `W8A8Linear` (None for any other module)."""
    if not isinstance(m, W8A8Linear):
        return None
    qw = QuantizedWeight(W8A8_SCHEME, (m.out_features, m.in_features), torch.float32, m.codes, m.scale)
    tensors = {k: t for k, t in (("act_scale", m.act_scale), ("smooth", m.smooth)) if t is not None}
    options = {"activation": m.activation, "outlier_threshold": m.threshold, "smoothing": m.smoothing}
    return LayerRecord(KIND, qw, m.bias, None, options, tensors, label=m.format)


def build_w8a8_linear(rec: LayerRecord, name: str, kernel_weights: dict) -> W8A8Linear:
    """The `W8A8Linear` of a ``w8a8`` record."""
    qw, opts = rec.weight, rec.options
    if qw.scheme != W8A8_SCHEME:
        raise ValueError(f"W8A8 weights are {W8A8_SCHEME.name}, not {qw.scheme.name}")
    activation = opts.get("activation")
    if activation not in ("token", "tensor"):
        raise ValueError(f"unknown activation mode {activation!r}")
    if (activation == "tensor") != ("act_scale" in rec.tensors):
        raise RecordError(f"W8A8 layer {name!r}: activation {activation!r} does not fit its act_scale")
    threshold = opts.get("outlier_threshold")
    return W8A8Linear(
        qw.codes.reshape(-1), qw.scale.reshape(-1), rec.bias, out_features=qw.shape[0], in_features=qw.shape[1],
        act_scale=rec.tensors.get("act_scale"), threshold=None if threshold is None else float(threshold),
        smooth=rec.tensors.get("smooth"), smoothing=str(opts.get("smoothing", "")),
    )  # fmt: skip
