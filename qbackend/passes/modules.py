"""Module-level helpers shared by the module forms (``quantize_`` paths) of every workflow."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(name, parent, attribute, module) of each swappable linear, parents first."""
    for pname, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for cname, child in parent.named_children():
            swappable = isinstance(child, nn.Linear) and type(child).forward is nn.Linear.forward
            if swappable or is_conv1d(child):
                yield (f"{pname}.{cname}" if pname else cname), parent, cname, child


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ weight + bias`` with weight ``[nx, nf]``."""
    # duck-typed so that transformers stays optional
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and tuple(w.shape) == (getattr(m, "nx", None), getattr(m, "nf", None))
    )


def apply_keeping_dtypes(
    module: nn.Module, apply: Callable[..., Any], fn: Any, recurse: bool, names: tuple[str, ...]
) -> nn.Module:
    """``module._apply`` (``apply``: the ``nn.Module`` one) keeping the buffers ``names`` in their dtypes.

    Device moves apply to them; ``.half()`` / ``.to(dtype)`` do not: the ops need int codes and fp32 constants.
    """
    dtypes = {n: module._buffers[n].dtype for n in names if module._buffers.get(n) is not None}
    apply(fn, recurse)
    for n, dt in dtypes.items():
        b = module._buffers[n]
        if b is not None and b.dtype != dt:
            module._buffers[n] = b.to(dt)
    return module


def set_param(model: nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Set parameter (or buffer) ``fqn`` of ``model`` to ``value`` (a new Parameter keeping requires_grad):
    a fold's value moved onto the module, so a checkpoint holds it."""
    owner_name, _, attr = fqn.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        grad = old is not None and old.requires_grad
        owner._parameters[attr] = nn.Parameter(value, requires_grad=grad)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise ValueError(f"{fqn!r} is no parameter or buffer of the model; cannot set its folded value")
