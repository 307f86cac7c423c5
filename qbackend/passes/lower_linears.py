"""Lower the selected linear layers to the quantized ops of :mod:`qbackend.kernels`.

For each planned layer the weight is quantized once (from the real parameter, at compile time;
shared through :mod:`.weight_cache`), its kernel tensors become buffers of the GraphModule read by
``get_attr`` (so they are inputs of the compiled graph, never baked-in copies), and every lowerable
site becomes ``op(x, *weight_tensors, bias, *statics)``.

Invariant: the rewritten graph computes, for every lowered site, ``F.linear(x, dequant(quant(W)), b)``
and is otherwise unchanged; layers not lowered keep their float computation and are reported with
their reason; the graph lints; running the pass again changes nothing (lowered sites no longer
match a float linear).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..kernels import UnsupportedWeight
from ..report import LayerReport, Report
from .params import ParamRef
from .select_layers import LayerPlan
from .weight_cache import QuantEntry, get_entry

BUFFER_PREFIX = "_qbackend_"
#: node meta key on each inserted op: the (param name, transposed) of the layer it computes
LAYER_META = "qbackend_layer"


@dataclass
class Lowered:
    """A quantized layer of a rewritten graph: its shared entry and where its parameter comes from."""

    entry: QuantEntry
    param: ParamRef


@dataclass
class LoweringResult:
    report: Report
    lowered: list[Lowered] = field(default_factory=list)
    nodes: int = 0  # quantized op nodes inserted


def lower_linears(gm: fx.GraphModule, plans: list[LayerPlan], measure_error: bool = False) -> LoweringResult:
    """Rewrite ``gm`` in place for ``plans``; returns the per-layer report and the quantized weights."""
    result = LoweringResult(Report(graphs=1))
    for plan in plans:
        row = _row(plan)
        result.report.layers.append(row)
        sites = plan.lowerable_sites
        if not sites:
            continue
        assert plan.scheme is not None
        try:
            entry = get_entry(plan.param.tensor, plan.scheme, plan.transposed, plan.name, measure_error)
        except UnsupportedWeight as e:
            row.reason = f"unsupported: {e.reason}"
            continue
        attrs = _register(gm, plan.name, entry)
        for site in sites:
            _rewrite(gm.graph, site, entry, attrs)
            result.nodes += 1
        result.lowered.append(Lowered(entry, plan.param))
        row.quantized, row.format = True, entry.scheme.name
        row.bits_per_param, row.bytes_after = entry.bits_per_param, entry.nbytes
        if measure_error:
            row.rel_error = entry.relative_error(plan.param.tensor)
    if result.nodes:
        gm.graph.lint()
        gm.recompile()
    return result


def _row(plan: LayerPlan) -> LayerReport:
    w = plan.param.tensor
    bits = w.element_size() * 8
    shape = (w.shape[1], w.shape[0]) if plan.transposed else (w.shape[0], w.shape[1])
    return LayerReport(
        name=plan.name,
        param=plan.param.fqn,
        shape=(int(shape[0]), int(shape[1])),
        forms=tuple(s.form for s in plan.sites),
        quantized=False,
        reason=plan.reason,
        bits_per_param=float(bits),
        bytes_before=w.numel() * w.element_size(),
        bytes_after=w.numel() * w.element_size(),
        transposed=plan.transposed,
    )


def _register(gm: fx.GraphModule, layer: str, entry: QuantEntry) -> list[fx.Node | None]:
    """Buffers for the entry's tensors (one set per graph even for tied sites) and get_attr nodes for them."""
    graph = gm.graph
    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    base = BUFFER_PREFIX + re.sub(r"\W", "_", layer)
    nodes: list[fx.Node | None] = []
    for t, tname in zip(entry.kw.tensors, entry.kw.names, strict=True):
        if t is None:
            nodes.append(None)
            continue
        name = _free_name(gm, f"{base}_{tname}", t)
        if not hasattr(gm, name):
            gm.register_buffer(name, t)
            # Dynamo graphs map every parameter/buffer to a source (AOT autograd asserts it).
            if hasattr(gm, "_param_name_to_source"):
                from torch._dynamo.source import ConstantSource

                gm._param_name_to_source[name] = ConstantSource(name)
        with graph.inserting_before(first):
            nodes.append(graph.get_attr(name))
    return nodes


def _free_name(gm: fx.GraphModule, name: str, t: torch.Tensor) -> str:
    i, candidate = 0, name
    while hasattr(gm, candidate) and getattr(gm, candidate) is not t:
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def _rewrite(graph: fx.Graph, site, entry: QuantEntry, attrs: list[fx.Node | None]) -> None:
    # The node is turned into the op in place (not replaced): later sites may hold it as their input,
    # and its name, shape meta and stack trace stay valid.
    kw = entry.kw
    node = site.node
    node.op, node.target = "call_function", kw.op
    node.args, node.kwargs = (site.x, *attrs, site.bias, *kw.statics), {}
    node.meta[LAYER_META] = (site.param.fqn, site.transposed)
    for n in site.consumed:  # the matmul under a fused add, then the weight's transpose
        if not n.users:
            graph.erase_node(n)
