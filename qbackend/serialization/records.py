"""The manifest form of a `~qbackend.formats.LayerRecord` (the format-level description of one layer).

A record names no kernel op and no op argument: a layer is its kind (``weight_only``, ``w8a8`` or a
registered workflow's), its weight as a `QuantizedWeight` (:meth:`~qbackend.formats.QuantizedWeight.as_dict`:
the versioned `Scheme`, shape, dtype and named tensors), its bias, the kind's settings (``options``,
JSON) and the kind's further tensors. In the manifest every tensor is replaced by the name it is
stored under. Which kinds exist, and the option and tensor names each may carry, the workflows
declare (``Workflow.record_kinds``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core import registry
from ..formats import TENSOR_KEYS, LayerRecord, QuantizedWeight, Scheme
from .manifest import CheckpointError, read_records, tensor_uses


def record_to_json(name: str, rec: LayerRecord, store: Callable[[str, torch.Tensor], str]) -> dict[str, Any]:
    """The manifest entry of ``rec``; ``store(proposed_name, tensor)`` stores a tensor and returns its name."""
    weight = rec.weight.as_dict()
    out: dict[str, Any] = {
        "kind": rec.kind,
        "format": rec.label or rec.layer_scheme.name,
        "out_features": int(rec.weight.shape[0]),
        "in_features": int(rec.weight.shape[1]),
        "weight": {
            **{k: v for k, v in weight.items() if k not in TENSOR_KEYS},
            "tensors": {k: store(f"{name}.{k}", weight[k]) for k in TENSOR_KEYS if k in weight},
        },
        "bias": None if rec.bias is None else store(f"{name}.bias", rec.bias),
        "options": dict(rec.options),
        "tensors": {k: store(f"{name}.{k}", t) for k, t in rec.tensors.items()},
    }
    if rec.scheme is not None and rec.scheme != rec.weight.scheme:
        out["scheme"] = rec.scheme.as_dict()
    return out


def record_from_json(name: str, js: Any, tensors: Mapping[str, torch.Tensor], path: str) -> LayerRecord:
    """Inverse of :func:`record_to_json` over the checkpoint's tensors. Raises `CheckpointError` naming
    the layer, or (for a malformed record) `FormatError`/`KeyError`/... that :func:`read_records` words."""

    def stored(key: str, what: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise CheckpointError(f"{path}: layer {name!r}: its {what} ({key!r}) is not in the file; it is corrupt")
        return tensors[key]

    kind = js["kind"]
    kinds = registry.record_kinds()
    if kind not in kinds:
        raise CheckpointError(
            f"{path}: layer {name!r} is of kind {kind!r}, which this qbackend does not know "
            f"(known: {', '.join(kinds)}); upgrade qbackend"
        )
    w = dict(js["weight"])
    names = w.pop("tensors")
    w.update({k: stored(v, f"weight tensor {k!r}") for k, v in names.items()})
    weight = QuantizedWeight.from_dict(w, name=f"{name}.weight")
    scheme = Scheme.from_dict(js["scheme"], name=f"{name}.scheme") if "scheme" in js else None
    option_names, tensor_names = kinds[kind]
    options, extra = dict(js.get("options", {})), dict(js.get("tensors", {}))
    unknown = sorted({*options} - option_names) + sorted({*extra} - tensor_names)
    if unknown:
        raise CheckpointError(f"{path}: layer {name!r} ({kind}) has unknown entries {unknown}; upgrade qbackend")
    return LayerRecord(
        kind=kind, weight=weight, bias=None if js["bias"] is None else stored(js["bias"], "bias"),
        scheme=scheme, options=options, tensors={k: stored(v, k) for k, v in extra.items()},
        label=str(js.get("format", "")),
    )  # fmt: skip


def read_layers(
    manifest: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str
) -> tuple[dict[str, LayerRecord], list[tuple[str, str, torch.Tensor]]]:
    """The layer records of a current-format manifest, and ``(name, "param"|"buffer", tensor)`` for the rest."""
    layers = read_records(manifest["layers"], lambda name, js: record_from_json(name, js, tensors, path), path)
    return layers, tensor_uses(manifest, tensors)
