"""Lower the selected linear layers to the quantized ops of :mod:`qbackend.kernels`.

For each planned layer the weight is quantized once (from the real parameter, at compile time;
shared through :mod:`qbackend.passes.weight_cache`), its kernel tensors become buffers of the
GraphModule read by ``get_attr`` (so they are inputs of the compiled graph, never baked-in copies),
and every lowerable site becomes ``op(x, *weight_tensors, bias, *statics, compute)``, ``compute`` the
layer's arithmetic resolved from the config's option for this machine
(:func:`qbackend.kernels.compute_policy.resolve_weight`; it is an op argument, so Inductor's caches
key on it and the weight cache does not).

Invariant: the rewritten graph computes, for every lowered site, ``F.linear(x, dequant(quant(W)), b)``
and is otherwise unchanged; layers not lowered keep their float computation and are reported with
their reason; the graph lints; running the pass again changes nothing (lowered sites no longer
match a float linear).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ...kernels import KernelWeight, UnsupportedWeight
from ...kernels.compute_policy import DEFAULT_OPTION, call_mode, resolve_weight
from ...kernels.families import by_op_name
from ...passes.channel_fold import FoldReport
from ...passes.graph import attach_tensor, attr_name, become
from ...passes.lowering import BUFFER_PREFIX, Lowered, LoweringResult
from ...passes.report import Report, float_row
from ...passes.select_layers import LayerPlan
from ...passes.weight_cache import (
    QuantEntry,
    StaleWeightError,
    dequantize_kernel_weight,
    effective_weight,
    get_entry,
)
from ...passes.weight_stamp import WeightStamp


def lower_linears(
    gm: fx.GraphModule, plans: list[LayerPlan], measure_error: bool = False,
    quantizer_for: Callable[[LayerPlan], Any] | None = None, progress: Callable[[list], Iterable] | None = None,
    compute: str = DEFAULT_OPTION, fold: FoldReport | None = None,
) -> LoweringResult:  # fmt: skip
    """Rewrite ``gm`` in place for ``plans``; returns the per-layer report and the quantized weights.

    quantizer_for: a calibrated method's quantizer of a plan (None: round to nearest); progress:
    wraps the plans for a progress bar. ``compute``: the config's option ("auto", "fp32", "bf16",
    "int8"), resolved per layer; raises ``ComputeUnavailable`` for an explicit mode this CPU lacks
    the instructions for. ``fold``: a channel fold already applied to ``gm`` (AWQ): a layer whose
    output rows absorbed the next group's s is quantized from its folded weight, with its folded bias;
    the folded copy is then dropped (the fold report keeps none) and the layer's entry checks a stamp
    of the user's parameter (`FoldedEntry`).
    """
    result = LoweringResult(Report(graphs=1))
    for plan in progress(plans) if progress is not None else plans:
        row = float_row(plan.name, plan.param.fqn, plan.param.tensor, transposed=plan.transposed,
                        forms=tuple(s.form for s in plan.sites), reason=plan.reason)  # fmt: skip
        result.report.layers.append(row)
        sites = plan.lowerable_sites
        if not sites:
            continue
        assert plan.scheme is not None
        try:
            quantizer = quantizer_for(plan) if quantizer_for is not None else None
            folded = next((fold.weights[s.node] for s in sites if s.node in fold.weights), None) if fold else None
            source = plan.param.tensor if folded is None else folded
            stamp = None if folded is None else WeightStamp(plan.param.tensor)
            entry = get_entry(source, plan.scheme, plan.transposed, plan.name, measure_error, quantizer)
        except UnsupportedWeight as e:
            row.reason = f"unsupported: {e.reason}"
            continue
        kw = entry.kw
        mode = resolve_weight(compute, kw.op._opname, kw.statics, _device_type(kw)).mode
        attrs = _register(gm, plan.name, entry)
        scale = getattr(entry.quantizer, "input_scale", None)  # AWQ's 1/s: an explicit multiply of the input
        scale_attr = None
        if scale is not None:
            scale_attr = attach_tensor(gm, BUFFER_PREFIX + attr_name(plan.name, "input_scale"), scale)
        family = by_op_name(kw.op._opname)[0].name
        for site in sites:
            rows = _static_rows(site.x)
            site_mode = mode if rows is None else call_mode(compute, family, mode, rows)
            x = site.x if scale_attr is None else _scaled_input(gm, site, scale_attr)
            bias = site.bias
            if fold is not None:  # the fold's explicit multiply of x, folded bias
                x = next((fold.replaced[(r, x)] for r in (site.node, *site.consumed) if (r, x) in fold.replaced), x)
                bias = fold.replaced.get((site.node, bias), bias)  # type: ignore[arg-type]
            become(gm.graph, site, kw.op, (x, *attrs, bias, *kw.statics, site_mode))
            result.nodes += 1
        # A folded weight's entry follows a stamp of the user's parameter, not the (dropped) folded copy.
        result.lowered.append(Lowered(entry if stamp is None else FoldedEntry(entry, stamp), plan.param))
        row.quantized, row.format, row.compute = True, entry.scheme.name, mode
        row.bits_per_param, row.bytes_after = entry.bits_per_param, entry.nbytes
        if measure_error:
            inv = scale if scale is not None else _folded_inv_scale(entry.quantizer)
            row.rel_error = entry.relative_error(source) if inv is None else _scaled_error(source, plan, entry, inv)
        del source, folded
    if fold is not None:  # the float copies of folded weights, read by no one now (quantized above)
        _drop_unused_buffers(gm, BUFFER_PREFIX + "awq_")
        fold.weights.clear()
    if result.nodes:
        gm.graph.lint()
        gm.recompile()
    return result


@dataclass(eq=False)
class FoldedEntry:
    """The entry of a layer quantized from a folded copy of its parameter (AWQ: its output rows absorbed
    the next group's 1/s), checked against a stamp of the user's parameter instead of a kept copy.

    The codes cannot be re-made from the parameter alone (the fold would be lost), so a change is an
    error to recompile, never a re-quantization (the fold's own guard, which runs first, says the same).
    """

    entry: QuantEntry
    stamp: WeightStamp

    name = property(lambda self: self.entry.name)
    kw = property(lambda self: self.entry.kw)
    scheme = property(lambda self: self.entry.scheme)
    transposed = property(lambda self: self.entry.transposed)
    quantizer = property(lambda self: self.entry.quantizer)

    def is_stale(self, param: torch.Tensor, check: str = "sampled") -> bool:
        return not self.stamp.matches(param, check)

    def refresh(self, param: torch.Tensor, check: str | None = None) -> None:
        if check is not None and self.stamp.matches(param, check):
            return
        raise StaleWeightError(
            f"qbackend: weight of layer {self.name!r} was changed in place after compiling, but AWQ quantized it "
            "with the next layer's 1/s folded in; recompile (torch._dynamo.reset()) to use the new value"
        )


def _register(gm: fx.GraphModule, layer: str, entry: QuantEntry) -> list[fx.Node | None]:
    """get_attr nodes for the entry's tensors (one set of buffers per graph, even for tied sites)."""
    return [
        None if t is None else attach_tensor(gm, BUFFER_PREFIX + attr_name(layer, tname), t)
        for t, tname in zip(entry.kw.tensors, entry.kw.names, strict=True)
    ]


def _scaled_input(gm: fx.GraphModule, site: Any, scale: fx.Node) -> fx.Node:
    """``x * scale`` inserted before the site (in x's dtype, as `QuantizedLinear` computes it)."""
    example = site.x.meta.get("example_value", site.x.meta.get("val"))
    with gm.graph.inserting_before(site.node):
        if isinstance(example, torch.Tensor) and example.dtype != torch.float32:
            scale = gm.graph.call_method("to", (scale, example.dtype))
        mul = gm.graph.call_function(operator.mul, (site.x, scale))
    for k in ("example_value", "val"):
        if k in site.x.meta:
            mul.meta[k] = site.x.meta[k]
    return mul


def _folded_inv_scale(quantizer: Any) -> torch.Tensor | None:
    fold = getattr(quantizer, "fold", None)
    return None if fold is None else 1.0 / fold[0].float()


def _drop_unused_buffers(gm: fx.GraphModule, prefix: str) -> None:
    """Erase unread ``get_attr`` nodes of buffers named ``prefix...`` and the buffers no node reads."""
    dropped = set()
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users and str(node.target).startswith(prefix):
            dropped.add(str(node.target))
            node.meta.pop("example_value", None)  # a fold report may still name the node: keep no value
            gm.graph.erase_node(node)
    still_read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in dropped - still_read:
        delattr(gm, name)
        getattr(gm, "_param_name_to_source", {}).pop(name, None)
    gm.graph.lint()
    gm.recompile()


def _scaled_error(source: torch.Tensor, plan: LayerPlan, entry: QuantEntry, scale: torch.Tensor) -> float:
    """||W - dequant(W_q) * (1/s)|| / ||W||: the weight AWQ's layer computes with (its codes hold W * s)."""
    w = effective_weight(source, plan.transposed).float()
    deq = dequantize_kernel_weight(entry.kw).to(w.device) * scale.to(w.device)
    return float((w - deq).norm() / w.norm()) if float(w.norm()) > 0 else float((w - deq).norm())


def _static_rows(x: Any) -> int | None:
    """The row count M of a site's input when the graph fixes it (None: dynamic or unknown)."""
    val = x.meta.get("val", x.meta.get("example_value")) if isinstance(x, fx.Node) else None
    shape = getattr(val, "shape", None)
    if shape is None or len(shape) < 1 or not all(isinstance(d, int) for d in shape):
        return None
    return math.prod(shape[:-1])


def _device_type(kw: KernelWeight) -> str:
    return next(t for t in kw.tensors if t is not None).device.type
