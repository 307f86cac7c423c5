"""Turn what a user hands us (a module, a quantized module, a ``torch.compile``d module) into a module
whose linear layers are quantized modules, without touching the user's model.

Used by ``qbackend.save`` and ``qbackend.export_mlir``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..core import registry
from ..core.config import QuantConfig
from ..core.quantize import quantize_

log = logging.getLogger("qbackend")


def unwrap_compiled(model: Any) -> tuple[nn.Module, dict[str, Any] | None]:
    """``(module, qbackend options)`` of a ``torch.compile``d module; ``(model, None)`` for a plain one.

    The options are those given to ``torch.compile(..., backend="qbackend", options=...)`` (None for
    other backends or none given).
    """
    options = None
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        options = _compile_options(model)
        model = model._orig_mod
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a torch.compile'd module; got {type(model).__name__}")
    return model, options


def _compile_options(compiled: Any) -> dict[str, Any] | None:
    # torch.compile wraps the backend in a chain of objects linked by _torchdynamo_orig_backend; the
    # _TorchCompileWrapper in it keeps the backend's name and kwargs. Private, so look, never require.
    obj = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    for _ in range(8):
        if obj is None:
            return None
        if isinstance(obj, torch._TorchCompileWrapper):
            if getattr(obj, "compiler_name", None) != "qbackend":
                return None
            return dict(obj.kwargs.get("options") or {})
        obj = getattr(obj, "_torchdynamo_orig_backend", None) or getattr(obj, "compiler_fn", None)
    return None


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds a quantized module of any workflow (``Workflow.modules``)."""
    quantized = registry.module_types()
    return any(isinstance(m, quantized) for m in model.modules())


def shallow_copy_tree(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every tensor: swapping submodules of it leaves ``model`` as is."""
    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in memo:  # a submodule used twice stays one module
            return memo[id(m)]
        c = copy.copy(m)
        memo[id(m)] = c
        c._parameters = dict(m._parameters)
        c._buffers = dict(m._buffers)
        c._modules = {k: None if v is None else clone(v) for k, v in m._modules.items()}
        return c

    return clone(model)


def quantized_module(
    model: Any, options: Any = None, example_inputs: Any = None
) -> tuple[nn.Module, QuantConfig | None]:
    """A module with quantized linear layers for ``model``, and the config applied now (None if none).

    * already quantized (``qbackend.quantize_``): returned as is (``options`` must be empty;
      ``example_inputs`` is not needed);
    * otherwise quantized now with ``options`` (else the options it was compiled with, else the
      defaults) on a shallow copy; the user's model keeps its float layers. W8A8 layers become
      `W8A8Linear` (SmoothQuant: traced once on ``example_inputs``, default the calibration's first
      batch, to fold the scales as the backend does).
    """
    module, compiled_options = unwrap_compiled(model)
    if has_quantized_layers(module):
        if options:
            raise ValueError(
                "this model is already quantized (it has QuantizedLinear layers); "
                "quantization options cannot be applied again: pass no options"
            )
        return module, None
    chosen = options if options else compiled_options
    config = QuantConfig.from_options(chosen or None)
    copy_ = shallow_copy_tree(module)
    report = quantize_(copy_, config, example_inputs=example_inputs)
    log.info("qbackend: %s", report.summary())
    if not report.quantized:
        log.warning("qbackend: no linear layer was quantized (%s)", report.summary())
    return copy_, config
