"""Grouped-query attention without copying K/V: ``repeat_kv`` + SDPA -> SDPA(enable_gqa=True).

transformers repeats each key/value head ``n_rep`` times before ``scaled_dot_product_attention``
whenever it is traced by Dynamo or given a mask (a static KV cache always has one): an
``x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)`` per K and per V. Inductor
materialises both, so every decode step writes and reads the whole cache ``n_rep`` times over (on
TinyLlama's 22 layers with a 640-token cache: ~210 MB per token, a third of its NF4 weights). SDPA
computes the same thing from the unrepeated heads with ``enable_gqa=True`` (query head ``i`` uses
key/value head ``i // n_rep``, exactly what the repeat builds), and its CPU kernel reads them in place.

Invariant: the rewritten graph computes the same attention (same query/key/value values per head,
same mask, scale, dropout and causality); a site is rewritten only when K and V are both repeated by
the same factor along dim 1 through that exact pattern (or ``repeat_interleave`` along dim 1) and the
query's head count equals the repeated one. Anything else is left untouched.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["SDPA_TARGETS", "use_grouped_kv"]

#: the call targets of scaled dot-product attention in a Dynamo graph
SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_FULL = slice(None, None, None)


def _shape(node: object) -> tuple[int, ...] | None:
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _unrepeated(node: object) -> tuple[fx.Node, int] | None:
    """(the [b, h, s, d] tensor, n_rep) when ``node`` repeats its heads n_rep times along dim 1."""
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function"):
        return None
    out = _shape(node)
    if out is None or len(out) != 4:
        return None
    if node.op == "call_function" and node.target is torch.repeat_interleave:
        src = node.args[0]
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        repeats = node.kwargs.get("repeats", node.args[1] if len(node.args) > 1 else None)
        src_shape = _shape(src)
        # a tensor of per-head counts may repeat heads unevenly: only one int count is a uniform repeat
        if dim != 1 or not isinstance(repeats, int) or src_shape is None or len(src_shape) != 4:
            return None
        if out == (src_shape[0], src_shape[1] * repeats, src_shape[2], src_shape[3]):
            return src, repeats
        return None
    if node.op != "call_method" or node.target not in ("reshape", "view"):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    index = expand.args[0]
    if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target is operator.getitem):
        return None
    src, key = index.args
    if key not in ((_FULL, _FULL, None), (_FULL, _FULL, None, _FULL, _FULL)):
        return None
    src_shape, mid = _shape(src), _shape(expand)
    if src_shape is None or mid is None or len(src_shape) != 4 or len(mid) != 5:
        return None
    b, h, s, d = src_shape
    if mid != (b, h, mid[2], s, d) or out != (b, h * mid[2], s, d):
        return None
    return src, mid[2]


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the repeat chains left without users (only those: a graph-wide dead-code pass would also
    drop in-place updates whose result is unused, such as a static KV cache's ``index_copy_``)."""
    while nodes:
        n = nodes.pop()
        if n.graph is graph and not n.users and n.op in ("call_method", "call_function"):
            inputs = [a for a in n.all_input_nodes if a.op in ("call_method", "call_function")]
            graph.erase_node(n)
            nodes.extend(a for a in inputs if a.target in ("expand", "reshape", "view", operator.getitem,
                                                           torch.repeat_interleave))


def use_grouped_kv(gm: fx.GraphModule) -> int:
    """Rewrite every SDPA fed by repeated K/V heads to ``enable_gqa=True``; returns how many."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS or node.kwargs.get("enable_gqa", False):
            continue
        if len(node.args) < 3 or "key" in node.kwargs or "value" in node.kwargs:
            continue
        q_shape = _shape(node.args[0])
        k, v = _unrepeated(node.args[1]), _unrepeated(node.args[2])
        if q_shape is None or len(q_shape) != 4 or k is None or v is None or k[1] != v[1] or k[1] < 2:
            continue
        if q_shape[1] != _shape(k[0])[1] * k[1]:
            continue
        orphans = [node.args[1], node.args[2]]
        node.args = (node.args[0], k[0], v[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        rewritten += 1
        _erase_unused(gm.graph, orphans)
    if rewritten:
        gm.recompile()
    return rewritten
