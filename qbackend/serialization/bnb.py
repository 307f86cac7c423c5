"""Load a bitsandbytes 4-bit (QLoRA NF4/FP4) checkpoint into a model as weight-only quantized layers.

The codes and (nested) constants are taken as they are (:func:`qbackend.formats.bnb_interop.from_bnb_state_dict`
re-labels, never re-quantizes); bitsandbytes itself is not needed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..formats import FormatError, LayerRecord
from ..formats.bnb_interop import from_bnb_state_dict
from .assign import check_materialised, set_tensor, swap_module
from .layers import build_layer
from .manifest import CheckpointError

_MARKERS = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
# Entries bitsandbytes writes next to a 4-bit weight (relative to "<prefix>weight").
_SUFFIXES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_type", ".blocksize",
             ".dtype", ".shape", ".nested_blocksize", ".nested_dtype", ".nested_offset", *_MARKERS)  # fmt: skip


def bnb_prefixes(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Module prefixes (``"encoder.layer.0.output.dense."``) of the 4-bit weights in ``state_dict``."""
    out = []
    for k in state_dict:
        for m in _MARKERS:
            if k.endswith("weight" + m):
                out.append(k[: -len("weight" + m)])
    return sorted(out)


def is_bnb_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return bool(bnb_prefixes(state_dict))


def load_bnb(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str) -> nn.Module:
    """Swap each 4-bit layer of ``model`` for the module of its ``weight_only`` record; assign every other tensor."""
    used: set[str] = set()
    kernel_weights: dict = {}  # tied layers share one set of kernel tensors
    for prefix in bnb_prefixes(state_dict):
        name = prefix.rstrip(".")
        try:
            qw = from_bnb_state_dict(state_dict, prefix)
        except FormatError as e:
            raise CheckpointError(f"{path}: bitsandbytes layer {name!r}: {e}") from None
        record = LayerRecord("weight_only", qw, state_dict.get(prefix + "bias"))
        swap_module(model, name, build_layer(name, record, kernel_weights, path), path, record.weight.shape)
        used.update(prefix + "weight" + s for s in _SUFFIXES)
        used.add(prefix + "bias")
    for k, t in state_dict.items():
        if k in used:
            continue
        owner, _, attr = k.rpartition(".")
        kind = "param"
        try:
            if attr in model.get_submodule(owner)._buffers:
                kind = "buffer"
        except AttributeError:
            pass  # set_tensor reports it
        set_tensor(model, k, t, kind, path)
    check_materialised(model, path)
    return model.eval()
