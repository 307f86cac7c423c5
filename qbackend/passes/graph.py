"""Graph edits every lowering pass makes: hold a tensor as a GraphModule attribute, turn a site into an op."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource

from .find_linears import LinearSite
from .lowering import LAYER_META


def attr_name(*parts: str) -> str:
    """An attribute name from a layer name and labels: non-identifier characters become ``_``."""
    return re.sub(r"\W", "_", "_".join(parts))


def attach_tensor(gm: fx.GraphModule, name: str, t: torch.Tensor) -> fx.Node:
    """A ``get_attr`` node reading ``t``, held by ``gm`` as ``name`` (``name_1``, ... while another tensor
    holds it; the same tensor keeps its attribute), placed before the graph's first computation.

    ``t`` is registered as is (the user's Parameter stays a Parameter, so AOT autograd lifts it as an
    input), never copied.
    """
    base, i = name, 0
    while hasattr(gm, name) and getattr(gm, name) is not t:
        i += 1
        name = f"{base}_{i}"
    if not hasattr(gm, name):
        if isinstance(t, torch.nn.Parameter):
            gm.register_parameter(name, t)
        else:
            gm.register_buffer(name, t)
        # Dynamo graphs map every parameter/buffer to a source (AOT autograd asserts it).
        if hasattr(gm, "_param_name_to_source"):
            gm._param_name_to_source[name] = ConstantSource(name)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        return gm.graph.get_attr(name)


def become(graph: fx.Graph, site: LinearSite, target: Any, args: tuple) -> None:
    """Turn the site's node into ``target(*args)`` and drop what it consumed (the matmul under a fused add,
    the weight's transpose) when nothing else reads it.

    In place, not replaced: later sites may hold the node as their input, and its name, shape meta and
    stack trace stay valid.
    """
    node = site.node
    node.op, node.target, node.args, node.kwargs = "call_function", target, args, {}
    node.meta[LAYER_META] = (site.param.fqn, site.transposed)
    for n in site.consumed:
        if not n.users:
            graph.erase_node(n)
