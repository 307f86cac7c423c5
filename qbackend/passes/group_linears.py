"""Weight-only linears that read the same input at decode -> one ``qbackend::linear_group`` call.

A Llama layer's q/k/v projections read one normalized input, and so do gate/up: at decode (a row or
a few) each is a kernel call with ~5-10 us of Python and a thread-pool region of its own around a
kernel of ~5-20 us. Here the calls of one op family on the same input become one group call
(:mod:`qbackend.kernels.linear_group`: one foreign call that quantizes x once and runs every member's
rows in one region), whose flat output is split back by views: every former output keeps its shape and
(contiguous) strides, so the code that reads it, and Inductor's fusion of it, are unchanged.

Invariant: each rewritten output equals the former call's output bit for bit (the group op is defined
as its members' ops, and its CPU kernel computes each output row with the member's own kernels), and a
call is grouped only where that holds and it pays: calls of the same weight-only op with the same ``x``
node, the same literal ``compute`` and the same in_features, each run by the CPU group kernel here
(int8 compute, or int16 compute on the packed copies, on a CPU with those kernels: elsewhere a group
would only add copies), fp32 CPU ``x`` of static shape with at most :data:`MAX_ROWS` rows, no output
needing a gradient, weights and bias graph inputs or attributes (never computed by the graph), no output
returned by the graph itself; at least two such calls. Everything else is left untouched.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from ..kernels import linear_group as lg
from ..kernels.families import FAMILIES

__all__ = ["MAX_ROWS", "group_linears"]

#: the pass runs (benchmarks switch it off for A/B measurements)
ENABLED = True

#: most rows of x (product of its leading dimensions) a group may have: decode, a few tokens at a time
MAX_ROWS = 8

_FAMILIES = {
    getattr(torch.ops.qbackend, f.op_name).default: f
    for f in FAMILIES.values()
    if f.computes and not f.extras and not f.floats
}


def _value(node: object) -> torch.Tensor | None:
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _static(*dims: object) -> bool:
    return all(type(d) is int for d in dims)


def _key(node: fx.Node) -> tuple | None:
    """(op, x node, compute, in_features) of a groupable call (op: the call's target), else None."""
    f = _FAMILIES.get(node.target)  # type: ignore[arg-type]
    if f is None:
        return None
    try:
        a = f.bind(node.args, node.kwargs)
    except TypeError:
        return None
    x, y = _value(a.x), _value(node)
    ints = [a[i] for i in f.ints]
    if x is None or y is None or not isinstance(a.compute, str) or not _static(*ints, *x.shape):
        return None
    if x.dtype is not torch.float32 or x.device.type != "cpu" or x.dim() < 1 or y.requires_grad or x.requires_grad:
        return None
    k = x.shape[-1]
    if k != a.in_features or not 0 < x.numel() // max(k, 1) <= MAX_ROWS:
        return None
    for name in (*(t.name for t in f.weights), "bias"):
        t = a[name]
        if t is not None and not (isinstance(t, fx.Node) and t.op in ("placeholder", "get_attr")):
            return None
        if isinstance(t, fx.Node) and (v := _value(t)) is not None and v.requires_grad:
            return None
    if any(u.op == "output" for u in node.users) or not lg.has_cpu_group_kernel(f.op_name, ints, a.compute):
        return None
    return (node.target, a.x, a.compute, k)


def group_linears(gm: fx.GraphModule) -> int:
    """Rewrite each set of groupable calls (see the module docstring) to one ``qbackend::linear_group``
    call and views of its output; returns how many calls were grouped. Compiled code then calls the
    CPU group kernel directly."""
    if not ENABLED:
        return 0
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = _key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
    grouped = 0
    g = gm.graph
    for (target, x, compute, _), nodes in groups.items():
        if len(nodes) < 2:
            continue
        f = _FAMILIES[target]
        bound = [f.bind(n.args, n.kwargs) for n in nodes]
        tensors, ints = [], []
        for a in bound:
            tensors += [*(a[t.name] for t in f.weights), a.bias]
            ints += [a[i] for i in f.ints]
        lead = tuple(_value(x).shape[:-1])  # type: ignore[union-attr]
        rows = math.prod(lead)
        order = {n: i for i, n in enumerate(g.nodes)}
        for t in tensors:  # attributes read after the first call: read before it (they have no inputs)
            if isinstance(t, fx.Node) and t.op == "get_attr" and order[t] > order[nodes[0]]:
                nodes[0].prepend(t)
        with g.inserting_before(nodes[0]):
            call = g.call_function(torch.ops.qbackend.linear_group.default, (x, tensors, ints, f.op_name, compute))
            off = 0
            for n, a in zip(nodes, bound, strict=True):
                width = a.out_features
                part = g.call_function(operator.getitem, (call, slice(rows * off, rows * (off + width))))
                view = g.call_function(torch.Tensor.view, (part, (*lead, width)))
                view.meta.update(n.meta)
                off += width
                n.replace_all_uses_with(view)
        for n in nodes:
            g.erase_node(n)
        grouped += len(nodes)
    if grouped:
        lg.install_direct()
        gm.recompile()
    return grouped
