"""QLoRA under DDP: the quantized base replicated on every rank, the adapters' gradients all-reduced.

>>> model = replicate_qlora(model)     # torch's DistributedDataParallel, set up for a frozen base

DDP broadcasts rank 0's parameters and buffers once at construction, so every rank starts from the
same quantized base and adapters. Afterwards only parameters that require gradients (the adapters)
are all-reduced. ``broadcast_buffers`` is off by default: `QuantizedLinear` keeps its codes and
constants as buffers, which never change, and DDP would otherwise re-broadcast the whole quantized
base before every forward.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def replicate_qlora(model: nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Wrap ``model`` (quantized base + adapters) in ``DistributedDataParallel``.

    ddp_kwargs: passed to DDP (``device_ids``, ``process_group``, ...); ``broadcast_buffers``
    defaults to False (see the module docstring). Raises ValueError when nothing is trainable.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(model).__name__}: no trainable parameter (add adapters first, e.g. add_lora)")
    ddp_kwargs.setdefault("broadcast_buffers", False)
    return DistributedDataParallel(model, **ddp_kwargs)
