"""The one place that knows the quantized layer modules: a module -> its `LayerRecord` (save), a record -> a
module (load). Modules are rebuilt from the format record (``prepare_weight`` picks the kernel), so
nothing here depends on kernel op names or op signatures.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from ..formats import FormatError, QuantizedWeight, Scheme
from ..formats.nested import NestedConstants
from ..kernels import KernelWeight, UnsupportedWeight, prepare_weight
from ..workflows.qat.deploy import QATQuantizedLinear
from ..workflows.w8a8.linear import W8A8Linear
from ..workflows.weight_only.linear import QuantizedLinear
from .manifest import CheckpointError
from .records import LayerRecord

#: W8A8 weights: int8, symmetric, one scale per output channel.
W8A8_SCHEME = Scheme("int", 8, symmetric=True, granularity="channel", axis=0)



def is_quantized_layer(m: nn.Module) -> bool:
    return isinstance(m, (QuantizedLinear, W8A8Linear))


def layer_record(m: nn.Module, name: str = "layer") -> LayerRecord | None:
    """The format record of a quantized layer module (None for any other module)."""
    try:
        if isinstance(m, W8A8Linear):
            qw = QuantizedWeight(W8A8_SCHEME, (m.out_features, m.in_features), torch.float32, m.codes, m.scale)
            tensors = {k: t for k, t in (("act_scale", m.act_scale), ("smooth", m.smooth)) if t is not None}
            options = {"activation": m.activation, "outlier_threshold": m.threshold, "smoothing": m.smoothing}
            rec = LayerRecord("w8a8", qw, m.bias, None, options, tensors, label=m.format)
        elif isinstance(m, QuantizedLinear):
            bufs = dict(m.named_buffers(recurse=False))
            qw = weight_from_kernel_buffers(m.scheme, m.out_features, m.in_features, bufs.get, name)
            options, tensors = {}, {}
            if isinstance(m, QATQuantizedLinear):
                options["activations"] = m.activations
                if m.activations == "static":
                    tensors["act_scale"] = m.act_scale
            rec = LayerRecord("weight_only", qw, m.bias, m.scheme, options, tensors)
        else:
            return None
        rec.weight.validate(f"{name}.weight")
    except FormatError as e:
        raise CheckpointError(f"cannot save quantized layer {name!r}: {e}") from None
    return rec


def weight_from_kernel_buffers(
    scheme: Scheme, n: int, k: int, get: Callable[[str], torch.Tensor | None], name: str
) -> QuantizedWeight:
    """The `QuantizedWeight` a `QuantizedLinear`'s buffers hold (the inverse of ``prepare_weight``'s layout).

    ``get(name)``: the buffer ``name`` or None. Names: ``codes``, ``absmax`` or ``nested_codes`` /
    ``nested_absmax`` / ``nested_offset`` (nf4/fp4), ``scale`` and ``zero_point`` (int): the layer's
    buffer (state_dict) names, which format-1 checkpoints stored too (:mod:`.legacy` reads them
    through this function). Should the module's buffers be renamed, translate in `layer_record`'s
    getter, not here. Exact: per-channel/per-tensor int scales are held expanded (one per row) and come back as they
    were; nested int4 group constants are held decoded, so they come back plain (``scheme.nested``
    off: the same values the kernels use).
    """

    def need(b: str) -> torch.Tensor:
        t = get(b)
        if t is None:
            raise FormatError(f"{name}.{b}: missing (needed by {scheme.name})")
        return t

    codes = need("codes").reshape(-1)
    if scheme.kind in ("nf4", "fp4"):
        if scheme.nested:
            nested = NestedConstants(need("nested_codes").reshape(-1), need("nested_absmax").reshape(-1),
                                     need("nested_offset").reshape(()), scheme.nested_blocksize)  # fmt: skip
            return QuantizedWeight(scheme, (n, k), torch.float32, codes, None, None, nested)
        return QuantizedWeight(scheme, (n, k), torch.float32, codes, need("absmax").reshape(-1))
    scale, zp = need("scale"), get("zero_point")
    if scheme.granularity == "block":  # int4 groups along K: held [N, groups]
        return QuantizedWeight(replace(scheme, nested=False), (n, k), torch.float32, codes, scale, zp)

    def per_row(t: torch.Tensor | None) -> torch.Tensor | None:  # held one per output row
        if t is None:
            return None
        return t.reshape(-1)[:1].clone() if scheme.granularity == "tensor" else t.reshape(-1)

    return QuantizedWeight(scheme, (n, k), torch.float32, codes, per_row(scale), per_row(zp))


def build_layer(name: str, rec: LayerRecord, shared: dict[tuple, KernelWeight], path: str) -> nn.Module:
    """The module for ``rec``. ``shared``: kernel weights built so far, so tied layers share their tensors."""
    try:
        if rec.kind == "w8a8":
            layer = _w8a8(name, rec, path)
        else:
            qw = rec.weight
            key = (qw.codes.data_ptr(), json.dumps(qw.scheme.as_dict(), sort_keys=True), qw.shape)
            kw = shared.get(key)
            if kw is None:
                kw = shared[key] = prepare_weight(qw)
            activations = rec.options.get("activations", "none")
            if activations == "none":
                layer = QuantizedLinear(kw, rec.bias, rec.layer_scheme)
            elif activations in ("dynamic", "static"):
                scale = rec.tensors.get("act_scale")
                if (scale is None) == (activations == "static"):
                    state = "missing" if scale is None else "set"
                    raise ValueError(f"activations {activations!r} with act_scale {state}")
                layer = QATQuantizedLinear(kw, rec.bias, rec.layer_scheme, activations, scale)
            else:
                raise ValueError(f"unknown activations {activations!r}")
    except UnsupportedWeight as e:
        raise CheckpointError(f"{path}: quantized layer {name!r}: no kernel runs it ({e.reason})") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt record for quantized layer {name!r} ({e})") from None
    _check_shapes(layer, name, path)
    return layer


def _w8a8(name: str, rec: LayerRecord, path: str) -> nn.Module:
    qw, opts = rec.weight, rec.options
    if qw.scheme != W8A8_SCHEME:
        raise ValueError(f"W8A8 weights are {W8A8_SCHEME.name}, not {qw.scheme.name}")
    activation = opts.get("activation")
    if activation not in ("token", "tensor"):
        raise ValueError(f"unknown activation mode {activation!r}")
    if (activation == "tensor") != ("act_scale" in rec.tensors):
        raise CheckpointError(f"{path}: W8A8 layer {name!r}: activation {activation!r} does not fit its act_scale")
    threshold = opts.get("outlier_threshold")
    return W8A8Linear(
        qw.codes.reshape(-1), qw.scale.reshape(-1), rec.bias, out_features=qw.shape[0], in_features=qw.shape[1],
        act_scale=rec.tensors.get("act_scale"), threshold=None if threshold is None else float(threshold),
        smooth=rec.tensors.get("smooth"), smoothing=str(opts.get("smoothing", "")),
    )  # fmt: skip


def _check_shapes(layer: nn.Module, name: str, path: str) -> None:
    """Run the layer on a fake input, so a bad file fails at load, not at first call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            layer(torch.empty(1, layer.in_features))
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: quantized layer {name!r} does not fit its record: {e}") from None
