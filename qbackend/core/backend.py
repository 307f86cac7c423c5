"""The ``qbackend`` torch.compile backend (registered via the ``torch_dynamo_backends`` entry point).

``torch.compile(model, backend="qbackend", options=..., mode=...)``:

1. ``options`` -> a config: :class:`qbackend.core.config.QuantConfig`, or the config object of a
   registered workflow (``mode`` -> Inductor's own mode patches).
2. The workflow handling that config (:mod:`qbackend.core.registry`) rewrites the Dynamo graph:
   linear layers become quantized ops reading quantized buffers. This happens BEFORE Inductor, so
   Inductor's caches key on the rewritten graph (a rewrite inside ``inner_compile`` would be
   skipped on a warm cache hit). Before it, attention fed by repeated K/V heads (grouped-query
   attention as transformers traces it) reads the heads in place (:mod:`qbackend.passes.grouped_kv`), and CPU
   attention over a few query positions (decode) runs a fused kernel (:mod:`qbackend.passes.decode_attention`).
3. Inductor (``compile_fx``) compiles the rewritten graph; its generated code calls our CPU kernels
   directly (:mod:`qbackend.kernels.direct`).
4. The compiled callable is wrapped by a per-call weight check: a quantized weight changed since it
   was quantized (version, storage and a sampled fingerprint, see :mod:`qbackend.passes.weight_stamp`)
   is re-quantized into the same buffers, or raises (``on_weight_change="error"``). Never a silently
   stale result. The workflow may add its own
   guard (SmoothQuant: parameters folded into constants must not change).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ..kernels import direct
from ..passes import LoweringResult, graph_params
from ..passes.decode_attention import use_decode_attention
from ..passes.group_linears import group_linears
from ..passes.grouped_kv import use_grouped_kv
from ..passes.weight_cache import StaleWeightError
from ..passes.weight_stamp import DeviceProbes, FoldedCheck, check_mode
from . import registry
from .config import QuantConfig

__all__ = ["StaleWeightError", "guard_weights", "inductor_patches", "qbackend", "resolve_config", "run_passes"]

log = logging.getLogger("qbackend")
_warned_frozen_grad = False


def resolve_config(options: Any) -> Any:
    """``options`` as a config: a registered workflow's own config object as is, else a `QuantConfig`."""
    if registry.config_workflow(options) is not None:
        return options
    return QuantConfig.from_options(options)


def run_passes(gm: fx.GraphModule, config: Any, measure_error: bool = False) -> LoweringResult:
    """The compile path of the workflow handling ``config`` on a Dynamo graph (in place)."""
    return registry.workflow_for(config, gm).compile(gm, config, measure_error)


def qbackend(gm: fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None, options: Any = None):
    """Compile ``gm``: run the workflow's passes, then hand the graph to Inductor."""
    from torch._inductor.compile_fx import compile_fx  # Inductor loads slowly: only when compiling

    direct.install()  # the compiled code calls our CPU kernels without the dispatcher round trip
    config = resolve_config(options)
    workflow = registry.workflow_for(config, gm)
    patches = inductor_patches(mode, config)
    if use_grouped_kv(gm):  # exact: K/V heads read in place instead of copied n_rep times per call
        log.debug("qbackend: grouped-query attention without the repeated K/V copies")
    if use_decode_attention(gm):  # exact: decode-time CPU attention by the fused kernel
        log.debug("qbackend: decode attention by qbackend::decode_attention")
    result = workflow.compile(gm, config, log.isEnabledFor(logging.DEBUG))
    _log(result, gm)
    if grouped := group_linears(gm):  # exact: linears reading one input at decode in one kernel call
        log.debug("qbackend: %d linears in groups reading the same input", grouped)
    key = {}
    if patches.get("post_grad_custom_post_pass", torch._inductor.config.post_grad_custom_post_pass) is None:
        # keys Inductor's cache on the direct kernel calls (code cached without them is not reused)
        key["post_grad_custom_post_pass"] = direct.cache_key_pass()
    compiled = compile_fx(gm, example_inputs, config_patches={**patches, **key} or None)
    # Inductor freezing (inference only) copies the quantized buffers into constants too: no refresh then.
    freezing = bool(patches.get("freezing", torch._inductor.config.freezing)) and not torch.is_grad_enabled()
    compiled = guard_weights(compiled, result, config, _frozen_params(gm, result), freezing=freezing)
    return compiled if workflow.guard is None else workflow.guard(result, compiled)


def inductor_patches(mode: str | None, config: Any) -> dict[str, Any]:
    """Inductor config patches: ``mode`` (else ``config.mode``) as ``backend="inductor"`` applies it, then
    ``config.inductor`` (a workflow's own config may have neither)."""
    patches: dict[str, Any] = {}
    mode = mode or getattr(config, "mode", None)
    if mode is not None and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(getattr(config, "inductor", None) or {})
    return patches


def guard_weights(
    compiled: Callable,
    result: LoweringResult,
    config: Any,
    frozen: list[tuple[str, torch.Tensor]] = (),  # type: ignore[assignment]
    freezing: bool = False,
) -> Callable:
    """Wrap ``compiled`` (called as ``compiled(*args)``) with a per-call check of the quantized weights.

    Parameters that are graph inputs are read from the call's arguments (no reference kept);
    ``get_attr`` parameters (Inductor freezing) are referenced (they are the user's own tensors).
    ``frozen``: float parameters Inductor froze into constants: a change raises (cannot be refreshed).
    ``freezing``: Inductor froze the quantized buffers too: a changed quantized weight raises as well.
    The check (``config.weight_check``) is described in :mod:`qbackend.passes.weight_stamp`.
    """
    check = check_mode(config)
    if check == "full":  # the strict checksum of what was quantized, taken now rather than on first call
        for lw in result.lowered:
            stamp = getattr(lw.entry, "stamp", None)
            if stamp is not None and stamp.matches(lw.param.tensor, "sampled"):
                stamp.matches(lw.param.tensor, "full")
    from_args = [(lw.param.input_index, lw.entry) for lw in result.lowered if lw.param.input_index is not None]
    held = [(lw.param.tensor, lw.entry) for lw in result.lowered if lw.param.input_index is None]
    folded = [(FoldedCheck(name, p, check), p) for name, p in frozen]
    requantize = getattr(config, "on_weight_change", "requantize") == "requantize"
    if not (from_args or held or folded):
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
        entry.refresh(param, check)

    probes = DeviceProbes()

    def run(*args: Any) -> Any:
        pairs = [(args[idx], entry) for idx, entry in from_args] + held
        # Device fingerprints are read for all weights at once after the loop (one sync, not one per weight).
        with probes.collecting():
            verdicts = [(entry.is_stale(p, check), len(probes.deferred)) for p, entry in pairs]
            folded_ok = [(fc.ok(p, check), len(probes.deferred)) for fc, p in folded]
        bad = probes.stale()
        start = 0
        for (p, entry), (stale, end) in zip(pairs, verdicts, strict=True):
            if stale or (bad and any(i in bad for i in range(start, end))):
                changed(entry, p)
            start = end
        for (fc, _), (ok, end) in zip(folded, folded_ok, strict=True):
            if not ok or (bad and any(i in bad for i in range(start, end))):
                raise StaleWeightError(
                    f"qbackend: parameter {fc.name!r} was changed in place after compiling, but Inductor freezing "
                    "baked it into the compiled code; recompile (torch._dynamo.reset()) to use the new value"
                )
            start = end
        return compiled(*args)

    return run


def _frozen_params(gm: fx.GraphModule, result: LoweringResult) -> list[tuple[str, torch.Tensor]]:
    """Float parameters the graph holds as attributes (Inductor freezing on): Inductor may fold them."""
    lowered = {id(lw.param.tensor) for lw in result.lowered}
    return [(ref.fqn, ref.tensor) for ref in graph_params(gm).values()
            if ref.input_index is None and id(ref.tensor) not in lowered]  # fmt: skip


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
