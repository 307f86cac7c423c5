"""A quantized model in transformers' bitsandbytes 4-bit serialization (what ``BitsAndBytesConfig(load_in_4bit=True)``
models write), for transformers and peft users.

Each quantized layer's weight goes out through :func:`qbackend.formats.bnb_interop.to_bnb_state_dict`
(the same bytes bitsandbytes writes; nothing re-quantized); every other tensor as it is. Only nf4/fp4
layers of one kind (quant type, nesting, weight dtype) fit one ``quantization_config``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..formats import FormatError
from ..formats.bnb_interop import to_bnb_state_dict
from ..passes.modules import linear_modules
from ..serialization import CheckpointError
from ..serialization.layers import layer_record


def state_dict_and_config(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to store and the ``quantization_config`` for config.json."""
    tensors: dict[str, torch.Tensor] = {}
    kinds: set[tuple[str, bool, torch.dtype]] = set()
    quantized: list[str] = []
    for name, m in module.named_modules():
        rec = layer_record(m, name)
        if rec is None:
            continue
        if rec.kind != "weight_only" or rec.weight.scheme.kind not in ("nf4", "fp4"):
            what = rec.label or rec.weight.scheme.name
            raise CheckpointError(f"layer {name!r} is {what}; the bitsandbytes layout holds weight-only "
                                  "nf4/fp4 layers only (save with layout='qbackend')")  # fmt: skip
        try:
            entries = to_bnb_state_dict(rec.weight, f"{name}.")
        except FormatError as e:
            raise CheckpointError(f"layer {name!r}: {e}") from None
        kinds.add((rec.weight.scheme.kind, rec.weight.nested is not None, rec.weight.dtype))
        if rec.bias is not None:
            entries[f"{name}.bias"] = rec.bias
        tensors.update(entries)
        quantized.append(name)
    if not quantized:
        raise CheckpointError("the model has no quantized layer; nothing to write in the bitsandbytes layout")
    if len(kinds) > 1:
        raise CheckpointError(f"the quantized layers mix {sorted((k, n) for k, n, _ in kinds)} (quant type, nested); "
                              "one bitsandbytes quantization_config describes one kind")  # fmt: skip
    prefixes = tuple(f"{n}." for n in quantized)
    for name, t in module.state_dict().items():
        if not name.startswith(prefixes):
            tensors[name] = t
    quant_type, nested, dtype = kinds.pop()
    float_linears = [name for name, _p, _a, _m in linear_modules(module)]
    config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": nested,
        "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        # transformers leaves these float (default: the output layer); ours are the layers left float
        "llm_int8_skip_modules": float_linears,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
    return _unshared(tensors), config


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied layers, the code tables): later ones are copied."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out
