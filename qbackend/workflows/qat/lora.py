"""LoRA adapters and QLoRA bases: train small adapters over a frozen (quantized) linear layer.

>>> add_lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"])   # freezes everything else
>>> quantize_base(model)        # frozen linears -> NF4 (nested) QuantizedLinear; float weights freed
>>> cmodel = torch.compile(model, backend="qbackend")

``quantize_base`` also handles models wrapped by ``peft`` (their ``base_layer`` is swapped). The
base runs the quantized op, which gives gradients to its input and saves only the quantized tensors
for backward (no float copy of the base weight exists at all).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from ...formats import Scheme
from ..weight_only.linear import QuantizedLinear

#: QLoRA's storage: NF4, blocks of 64, constants re-quantized to 8 bit in blocks of 256.
QLORA_SCHEME = Scheme("nf4", 4, blocksize=64, nested=True)


class LoRALinear(nn.Module):
    """``y = base(x) + B(A(dropout(x))) * alpha / r``, with ``base`` frozen and A, B trainable.

    base: an ``nn.Linear`` or a `QuantizedLinear` (anything with ``in_features``/``out_features``).
    dtype: the adapters' dtype (fp32 default; bf16 as in QLoRA). B starts at zero, so a fresh adapter
    leaves the output unchanged.
    """

    def __init__(
        self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive; got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scaling = r, alpha / r
        dev = next(iter(base.buffers()), None)
        dev = dev.device if dev is not None else next(base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype or torch.float32, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype or torch.float32, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default initialisation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.dropout(x).to(self.lora_A.dtype)
        delta = nn.functional.linear(nn.functional.linear(a, self.lora_A), self.lora_B)
        return y + (delta * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, adapter_dtype={self.lora_A.dtype}"


def _matches(name: str, targets: Iterable[str]) -> bool:
    # peft's rule: a target equals the module name or is its last dotted component(s); or a full regex.
    return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in targets)


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Wrap every linear module named by ``target_modules`` in a `LoRALinear` (in place).

    All other parameters of ``model`` are frozen. Returns the wrapped module names.
    """
    targets = tuple(target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (nn.Linear, QuantizedLinear)) and _matches(name, targets):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, LoRALinear(mod, r, alpha, dropout, dtype))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"add_lora: no linear module matches target_modules={list(targets)}")
    return wrapped


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters (the adapters after `add_lora` / peft)."""
    return [p for p in model.parameters() if p.requires_grad]


def quantize_base(
    model: nn.Module, scheme: Scheme = QLORA_SCHEME, exclude: Iterable[str] = ("lm_head",)
) -> list[str]:
    """Replace every FROZEN ``nn.Linear`` of ``model`` (weight without ``requires_grad``) by a
    `QuantizedLinear` in ``scheme`` (in place; float weights are freed). Trainable layers and LoRA
    adapters stay as they are; ``exclude`` lists module names/suffixes/regexes to keep float.
    Works on `LoRALinear` bases and on peft ``LoraLayer.base_layer``. Returns the quantized names.
    """
    skip = tuple(exclude)
    done = []
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear or mod.weight.requires_grad or _matches(name, skip):
            continue
        if _matches(name, ("lora_A", "lora_B")) or ".lora_A." in name or ".lora_B." in name:
            continue  # a frozen peft adapter (inactive) is not a base layer
        parent, _, child = name.rpartition(".")
        q = QuantizedLinear.from_weight(mod.weight, mod.bias, scheme, name=name)
        setattr(model.get_submodule(parent) if parent else model, child, q)
        done.append(name)
    return done


def dequantize_base(model: nn.Module) -> list[str]:
    """Inverse of `quantize_base` (in place): every `QuantizedLinear` becomes a frozen fp32 ``nn.Linear``
    holding its dequantized weight — the float reference a QLoRA run is compared against."""
    done = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantizedLinear):
            continue
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(mod.dequantized_weight())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        lin.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
        done.append(name)
    return done
