"""Reading checkpoint format 1 (qbackend up to the format records).

Format 1 stored, per quantized layer, the kernel op it ran (``"op"``), the op's int arguments
(``"statics"``: out_features, in_features, then block sizes) and the op's tensor arguments under their
argument names (``<layer>.codes``, ``<layer>.absmax``, ...; the layer's buffers), plus ``aliases`` for
tensors stored once under another name. Those names are mapped here, as plain strings (the ops may
since have been renamed or changed), onto the format-level `LayerRecord` the current reader builds
modules from (through the workflows' ``build`` handlers, as for format 2), so a format-1 file loads to
the same outputs. Code tables (``table``, ``nested_table``) were stored but are constants of the
format: they are not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..formats import LayerRecord, QuantizedWeight, Scheme
from ..kernels import weight_from_kernel_tensors
from .manifest import CheckpointError, read_records, tensor_uses

# Format-1 op name -> which schemes it ran (checked against the layer's stored scheme).
_WEIGHT_OPS = {
    "qbackend.codebook4_linear.default": lambda s: s.kind in ("nf4", "fp4"),
    "qbackend.int4_linear.default": lambda s: s.kind == "int" and s.bits == 4,
    "qbackend.int8_linear.default": lambda s: s.kind == "int" and s.bits == 8,
}
# Format-1 W8A8 op name -> whether it is the outlier variant (then ``outlier_threshold`` is set).
_W8A8_OPS = {"qbackend.w8a8_linear.default": False, "qbackend.w8a8_outlier_linear.default": True}
# Format 1 stored W8A8 weights as int8 codes, symmetric, one scale per output channel.
_W8A8_SCHEME = Scheme("int", 8, symmetric=True, granularity="channel", axis=0)


def read_layers_v1(
    manifest: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str
) -> tuple[dict[str, LayerRecord], list[tuple[str, str, torch.Tensor]]]:
    """The layer records of a format-1 manifest, and ``(name, "param"|"buffer", tensor)`` for the rest."""
    aliases = manifest["aliases"]

    def getter(layer: str):
        def get(arg: str) -> torch.Tensor | None:
            key = f"{layer}.{arg}"
            return tensors.get(aliases.get(key, key))

        return get

    layers = read_records(manifest["layers"], lambda name, rec: _record(name, rec, getter(name), path), path)
    return layers, tensor_uses(manifest, tensors, skip=tuple(f"{n}." for n in layers))


def _record(name: str, rec: dict[str, Any], get, path: str) -> LayerRecord:
    bias = get("bias")
    if rec["bias"] and bias is None:
        raise CheckpointError(f"{path}: layer {name!r} has a bias but {name}.bias is missing")
    op = rec["op"]
    if rec.get("kind") == "w8a8":
        if op not in _W8A8_OPS:
            raise CheckpointError(f"{path}: layer {name!r} names op {op!r}, which this qbackend does not read")
        threshold = rec["outlier_threshold"]
        if _W8A8_OPS[op] != (threshold is not None):
            raise ValueError(f"op {op} with outlier_threshold {threshold!r}")
        wanted = {"codes": True, "scale": True, "act_scale": rec["activation"] == "tensor", "smooth": rec["smooth"]}
        got = {k: get(k) for k in wanted}
        missing = [f"{name}.{k}" for k, want in wanted.items() if want and got[k] is None]
        if missing:
            raise CheckpointError(f"{path}: W8A8 layer {name!r} is missing {', '.join(missing)}")
        n, k = int(rec["out_features"]), int(rec["in_features"])
        qw = QuantizedWeight(_W8A8_SCHEME, (n, k), torch.float32, got["codes"].reshape(-1), got["scale"].reshape(-1))
        qw.validate(f"{name}.weight")
        extra = {k: got[k] for k in ("act_scale", "smooth") if wanted[k]}
        options = {"activation": rec["activation"], "outlier_threshold": threshold,
                   "smoothing": str(rec.get("smoothing", ""))}  # fmt: skip
        return LayerRecord("w8a8", qw, bias, None, options, extra, label=str(rec.get("format", "")))
    scheme = Scheme(**rec["scheme"])  # format 1 stored the plain fields (no version)
    runs = _WEIGHT_OPS.get(op)
    if runs is None:
        raise CheckpointError(f"{path}: layer {name!r} names op {op!r}, which this qbackend does not read")
    if not runs(scheme):
        raise ValueError(f"op {op} does not run {scheme.name}")
    n, k = (int(s) for s in rec["statics"][:2])
    # format-1 tensor names are the kernel tensor names read there; should those change, translate in get
    qw = weight_from_kernel_tensors(scheme, n, k, get, name)
    qw.validate(f"{name}.weight")
    return LayerRecord("weight_only", qw, bias, scheme)
