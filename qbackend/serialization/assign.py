"""Placing tensors and modules into a model being loaded (shared by the qbackend and bitsandbytes readers)."""

from __future__ import annotations

import torch
from torch import nn

from ..passes.modules import is_conv1d
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


def has_module(root: nn.Module, name: str) -> bool:
    """Whether ``root`` has a submodule ``name`` (a layer a record can replace)."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name)
    except AttributeError:
        return False
    return isinstance(getattr(parent, child, None), nn.Module)


def has_tensor(root: nn.Module, name: str) -> bool:
    """Whether ``root`` has a parameter or buffer slot ``name``."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = root.get_submodule(owner_name)
    except AttributeError:
        return False
    return attr in owner._parameters or attr in owner._buffers


def swap_module(model: nn.Module, name: str, layer: nn.Module, path: str, shape: tuple[int, ...] | None = None) -> None:
    """Replace the submodule ``name`` of ``model`` by ``layer``; ``shape``: the ``(out, in)`` of the
    record's weight, checked against the module replaced."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
    except AttributeError:
        raise CheckpointError(f"{path}: quantized layer {name!r} has no counterpart in the model") from None
    have = _linear_shape(old)
    if shape is not None and have is not None and tuple(have) != tuple(shape):
        raise CheckpointError(
            f"{path}: quantized layer {name!r} has weight shape {tuple(shape)} in the checkpoint "
            f"but {tuple(have)} in the model"
        )
    setattr(parent, child, layer)


def _linear_shape(m: object) -> tuple[int, ...] | None:
    """``(out_features, in_features)`` of a linear-like module (also on the meta device; GPT-2's Conv1D
    too), else None."""
    out_f, in_f = getattr(m, "out_features", None), getattr(m, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):
        return (out_f, in_f)
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return tuple(w.shape)[::-1] if is_conv1d(m) else tuple(w.shape)  # Conv1D stores [in, out]
    return None


def check_materialised(model: nn.Module, path: str) -> None:
    """Raise if a parameter or buffer of ``model`` is still on the meta device (the file did not hold it)."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise CheckpointError(
            f"{path}: the checkpoint does not hold {', '.join(repr(n) for n in left[:3])}{more}, "
            "which the model needs; is this the right model for it?"
        )
