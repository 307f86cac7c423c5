"""Quantized layer modules <-> their format records, through the workflows' handlers.

Save asks each workflow's ``record`` handler for a module's `LayerRecord`; load asks the workflows
that build the record's kind for its module (:func:`qbackend.core.registry.extension_order`: the
first answer wins). Nothing here knows a layer class, a kernel op or an op signature; a registered
workflow saves and loads its own layers with no edit here.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..core import registry
from ..formats import FormatError, LayerRecord, RecordError
from ..kernels import UnsupportedWeight
from .manifest import CheckpointError


def layer_record(m: nn.Module, name: str = "layer") -> LayerRecord | None:
    """The format record of a quantized layer module (None for any other module)."""
    for wf in registry.extension_order():
        if wf.record is None:
            continue
        try:
            rec = wf.record(m, name)
            if rec is None:
                continue
            rec.weight.validate(f"{name}.weight")
            check_layer_scheme(rec)
        except FormatError as e:
            raise CheckpointError(f"cannot save quantized layer {name!r}: {e}") from None
        if rec.kind not in registry.record_kinds():
            raise CheckpointError(f"cannot save quantized layer {name!r}: workflow {wf.name!r} records it as kind "
                                  f"{rec.kind!r}, which no workflow builds; list it in its record_kinds")  # fmt: skip
        return rec
    return None


def build_layer(name: str, rec: LayerRecord, kernel_weights: dict, path: str) -> nn.Module:
    """The module for ``rec``. ``kernel_weights``: shared by the whole load, so tied layers share their tensors."""
    try:
        check_layer_scheme(rec)
    except FormatError as e:
        raise CheckpointError(f"{path}: layer {name!r}: {e}") from None
    try:
        layer = _build(name, rec, kernel_weights)
    except UnsupportedWeight as e:
        raise CheckpointError(f"{path}: quantized layer {name!r}: no kernel runs it ({e.reason})") from None
    except RecordError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt record for quantized layer {name!r} ({e})") from None
    except RuntimeError as e:  # last resort: a module constructor refusing what its handler did not check
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt record for quantized layer {name!r} ({why})") from None
    if layer is None:
        raise CheckpointError(f"{path}: quantized layer {name!r} is a {rec.kind!r} record that no workflow builds "
                              f"with options {sorted(rec.options)}; upgrade qbackend")  # fmt: skip
    _check_shapes(layer, rec, name, path)
    return layer


def check_layer_scheme(rec: LayerRecord) -> None:
    """`FormatError` unless the record's layer scheme is its weight's, or that scheme with nested
    constants (nested int groups: the kernels hold them decoded, so the weight is stored plain)."""
    s, w = rec.scheme, rec.weight.scheme
    if s is None or s == w:
        return
    if s.nested and s.kind == "int" and s.granularity == "block" and replace(s, nested=False) == w:
        return
    raise FormatError(f"its scheme {s.name} does not fit its weight's {w.name}")


def _build(name: str, rec: LayerRecord, kernel_weights: dict) -> nn.Module | None:
    for wf in registry.extension_order():
        if wf.build is not None and rec.kind in wf.record_kinds:
            layer = wf.build(rec, name, kernel_weights)
            if layer is not None:
                return layer
    return None


def _check_shapes(layer: nn.Module, rec: LayerRecord, name: str, path: str) -> None:
    """Run the layer on a fake input, so a bad file fails at load, not at first call."""
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            layer(torch.empty(1, rec.weight.shape[1]))
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: quantized layer {name!r} does not fit its record: {e}") from None
