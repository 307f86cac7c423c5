"""The ``qbackend`` torch.compile backend (registered via the ``torch_dynamo_backends`` entry point).

Until the lowering passes land this hands the graph to Inductor unchanged, honouring ``mode`` and
``options`` exactly as ``torch.compile(backend="inductor")`` would.
"""

from __future__ import annotations

from typing import Any

import torch


def _inductor_config_patches(mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    patches: dict[str, Any] = {}
    if mode is not None and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    if options:
        patches.update(options)
    return patches


def qbackend(gm: torch.fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None, options: Any = None):
    """Compile ``gm``: run qbackend's passes, then hand the graph to Inductor."""
    from torch._inductor.compile_fx import compile_fx

    patches = _inductor_config_patches(mode, options)
    return compile_fx(gm, example_inputs, config_patches=patches or None)
