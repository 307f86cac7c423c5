"""Placing tensors and modules into a model being loaded (shared by the qbackend and bitsandbytes readers)."""

from __future__ import annotations

import torch
from torch import nn

from .manifest import CheckpointError


def set_tensor(root: nn.Module, name: str, value: torch.Tensor, kind: str, path: str) -> None:
    """Put ``value`` at ``name`` (a parameter or buffer path) of ``root``, replacing what is there."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = root.get_submodule(owner_name)
    except AttributeError:
        raise CheckpointError(f"{path}: the checkpoint has {name!r}; the model has no module {owner_name!r}") from None
    old = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
    if attr not in owner._parameters and attr not in owner._buffers:
        raise CheckpointError(f"{path}: the checkpoint has {name!r} but the model has no such parameter or buffer")
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise CheckpointError(
            f"{path}: {name!r} has shape {tuple(value.shape)} in the checkpoint but {tuple(old.shape)} in the model"
        )
    if attr in owner._parameters:
        requires_grad = old.requires_grad if old is not None else False
        owner._parameters[attr] = nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())
    else:
        owner._buffers[attr] = value


def swap_module(model: nn.Module, name: str, layer: nn.Module, path: str) -> None:
    """Replace the submodule ``name`` of ``model`` by ``layer``."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        getattr(parent, child)
    except AttributeError:
        raise CheckpointError(f"{path}: quantized layer {name!r} has no counterpart in the model") from None
    setattr(parent, child, layer)


def check_materialised(model: nn.Module, path: str) -> None:
    """Raise if a parameter or buffer of ``model`` is still on the meta device (the file did not hold it)."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise CheckpointError(
            f"{path}: the checkpoint does not hold {', '.join(repr(n) for n in left[:3])}{more}, "
            "which the model needs; is this the right model for it?"
        )
