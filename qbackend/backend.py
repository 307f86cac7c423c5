"""The ``qbackend`` torch.compile backend (registered via the ``torch_dynamo_backends`` entry point).

``torch.compile(model, backend="qbackend", options=..., mode=...)``:

1. ``options`` -> :class:`qbackend.config.QuantConfig` (``mode`` -> Inductor's own mode patches).
2. The passes of :mod:`qbackend.passes` rewrite the Dynamo graph: linear layers become quantized ops
   reading quantized buffers. This happens BEFORE Inductor, so Inductor's caches key on the
   rewritten graph (a rewrite inside ``inner_compile`` would be skipped on a warm cache hit).
3. Inductor (``compile_fx``) compiles the rewritten graph.
4. The compiled callable is wrapped by a per-call weight check: a quantized weight changed in place
   since it was quantized (``_version``/storage) is re-quantized into the same buffers, or raises
   (``on_weight_change="error"``). Never a silently stale result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from .config import QuantConfig
from .passes import LoweringResult, find_linears, graph_params, lower_linears, select_layers
from .passes.qat_insert import insert_qat

log = logging.getLogger("qbackend")
_warned_frozen_grad = False


class StaleWeightError(RuntimeError):
    """A weight was changed in place after compiling and the config says not to re-quantize."""


def run_passes(gm: fx.GraphModule, config: QuantConfig, measure_error: bool = False) -> LoweringResult:
    """The pass pipeline on a Dynamo graph (in place): find -> select -> lower."""
    if config.smoothquant is not None:  # W8A8 (issue 5): find -> select -> SmoothQuant fold -> W8A8 lowering
        from .smoothquant.pipeline import run_w8a8

        return run_w8a8(gm, config, measure_error=measure_error)
    sites = find_linears(gm)
    plans = select_layers(sites, config)
    # Issue 5 (SmoothQuant) folds scales into `plans` here.
    # QAT layers (prepared, or config.qat): fake quantization when grad is enabled, else their deployment.
    qat, plans = insert_qat(gm, plans, config)
    result = lower_linears(gm, plans, measure_error=measure_error)
    result.report.layers[:0] = qat.report.layers
    result.lowered[:0] = qat.lowered
    result.nodes += qat.nodes
    return result


def qbackend(gm: fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None, options: Any = None):
    """Compile ``gm``: run qbackend's passes, then hand the graph to Inductor."""
    from torch._inductor.compile_fx import compile_fx

    config = QuantConfig.from_options(options)
    patches = inductor_patches(mode, config)
    result = run_passes(gm, config, measure_error=log.isEnabledFor(logging.DEBUG))
    _log(result, gm)
    compiled = compile_fx(gm, example_inputs, config_patches=patches or None)
    # Inductor freezing (inference only) copies the quantized buffers into constants too: no refresh then.
    freezing = bool(patches.get("freezing", torch._inductor.config.freezing)) and not torch.is_grad_enabled()
    compiled = guard_weights(compiled, result, config, _frozen_params(gm, result), freezing=freezing)
    # SmoothQuant folded parameters into constants: a later in-place change raises (issue 5).
    return getattr(result, "guard_folded", lambda fn: fn)(compiled)


def inductor_patches(mode: str | None, config: QuantConfig) -> dict[str, Any]:
    """Inductor config patches: ``mode`` (else ``config.mode``) as ``backend="inductor"`` applies it, then
    ``config.inductor``."""
    patches: dict[str, Any] = {}
    mode = mode or config.mode
    if mode is not None and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(config.inductor)
    return patches


def guard_weights(
    compiled: Callable,
    result: LoweringResult,
    config: QuantConfig,
    frozen: list[tuple[str, torch.Tensor, int]] = (),  # type: ignore[assignment]
    freezing: bool = False,
) -> Callable:
    """Wrap ``compiled`` (called as ``compiled(*args)``) with a per-call check of the quantized weights' versions.

    Parameters that are graph inputs are read from the call's arguments (no reference kept);
    ``get_attr`` parameters (Inductor freezing) are referenced (they are the user's own tensors).
    ``frozen``: float parameters Inductor froze into constants: a change raises (cannot be refreshed).
    ``freezing``: Inductor froze the quantized buffers too: a changed quantized weight raises as well.
    """
    from_args = [(lw.param.input_index, lw.entry) for lw in result.lowered if lw.param.input_index is not None]
    held = [(lw.param.tensor, lw.entry) for lw in result.lowered if lw.param.input_index is None]
    requantize = config.on_weight_change == "requantize"
    if not (from_args or held or frozen):
        return compiled

    def changed(entry, param: torch.Tensor) -> None:
        if freezing:
            raise StaleWeightError(
                f"qbackend: weight of layer {entry.name!r} was changed in place after compiling, but Inductor "
                "freezing baked the quantized weight into the compiled code; recompile (torch._dynamo.reset())"
            )
        if not requantize:
            raise StaleWeightError(
                f"qbackend: weight of layer {entry.name!r} was changed in place after compiling "
                "(on_weight_change='error'); recompile (torch._dynamo.reset()) or use on_weight_change='requantize'"
            )
        log.info("qbackend: weight of %s changed after compiling; re-quantizing", entry.name)
        entry.refresh(param)

    def run(*args: Any) -> Any:
        for idx, entry in from_args:
            p = args[idx]
            if entry.is_stale(p):
                changed(entry, p)
        for p, entry in held:
            if entry.is_stale(p):
                changed(entry, p)
        for name, p, version in frozen:
            if p._version != version:
                raise StaleWeightError(
                    f"qbackend: parameter {name!r} was changed in place after compiling, but Inductor freezing "
                    "baked it into the compiled code; recompile (torch._dynamo.reset()) to use the new value"
                )
        return compiled(*args)

    return run


def _frozen_params(gm: fx.GraphModule, result: LoweringResult) -> list[tuple[str, torch.Tensor, int]]:
    """Float parameters the graph holds as attributes (Inductor freezing on): Inductor may fold them."""
    lowered = {id(lw.param.tensor) for lw in result.lowered}
    out = []
    for ref in graph_params(gm).values():
        if ref.input_index is None and id(ref.tensor) not in lowered and _has_version(ref.tensor):
            out.append((ref.fqn, ref.tensor, ref.tensor._version))
    return out


def _has_version(t: torch.Tensor) -> bool:
    try:
        t._version  # noqa: B018
        return True
    except RuntimeError:
        return False


def _log(result: LoweringResult, gm: fx.GraphModule) -> None:
    report = result.report
    if not report.layers:
        log.debug("qbackend: no linear layers in this graph")
        return
    log.info("qbackend: %s", report.summary())
    global _warned_frozen_grad
    trains = any(lw.param.tensor.requires_grad for lw in result.lowered)
    if not _warned_frozen_grad and torch.is_grad_enabled() and trains:
        _warned_frozen_grad = True  # once per process: grad-enabled inference is a legitimate use
        log.warning(
            "qbackend: grad is enabled; quantized weights are frozen and get no gradient "
            "(gradients flow to the inputs). Exclude layers you train."
        )
    if log.isEnabledFor(logging.DEBUG):
        log.debug("qbackend: layers\n%s", report)
