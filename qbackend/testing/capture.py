"""Capture the Dynamo graph(s) a torch.compile backend would receive, to test passes without Inductor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..passes.params import clone_graph_module


@dataclass
class CapturedGraph:
    """A Dynamo GraphModule and the real inputs it was called with (parameters included, in order)."""

    gm: fx.GraphModule
    example_inputs: list[Any]

    def run(self, gm: fx.GraphModule | None = None, inputs: list[Any] | None = None) -> list[torch.Tensor]:
        """Outputs of ``gm`` (default: this graph, as rewritten so far) on the example inputs, as a list."""
        with torch.no_grad():
            out = (gm or self.gm)(*(self.example_inputs if inputs is None else inputs))
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def clone(self) -> CapturedGraph:
        """An independent copy of the graph (passes rewrite in place); Dynamo metadata carried over."""
        return CapturedGraph(clone_graph_module(self.gm), list(self.example_inputs))


def capture_graphs(
    fn: Callable, *args: Any, dynamic: bool | None = False, reset: bool = True, **kwargs: Any
) -> list[CapturedGraph]:
    """Call ``torch.compile(fn, backend=<recorder>)(*args, **kwargs)`` and return every graph Dynamo produced.

    One graph per graph-break-separated region. ``reset`` clears Dynamo's caches first, so a model
    traced before (or the same class with another structure) is traced again. The call runs under
    the caller's grad mode; outputs are computed eagerly by the captured graphs.
    """
    graphs: list[CapturedGraph] = []
    graphargs: list[tuple[fx.Node, Any]] = []

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]):
        graphs.append(CapturedGraph(gm, list(example_inputs)))
        graphargs.extend((n, n.meta["grapharg"]) for n in gm.graph.find_nodes(op="placeholder") if "grapharg" in n.meta)
        return gm.forward

    if reset:
        torch._dynamo.reset()
    torch.compile(fn, backend=recorder, dynamic=dynamic)(*args, **kwargs)
    # Dynamo drops meta["grapharg"] once compiled; a backend sees it, so passes under test must too.
    for node, grapharg in graphargs:
        node.meta["grapharg"] = grapharg
    return graphs


def capture_graph(fn: Callable, *args: Any, **kwargs: Any) -> CapturedGraph:
    """Like :func:`capture_graphs` for code without graph breaks: exactly one graph (else ValueError)."""
    graphs = capture_graphs(fn, *args, **kwargs)
    if len(graphs) != 1:
        raise ValueError(f"expected one Dynamo graph, got {len(graphs)} (graph breaks?); use capture_graphs")
    return graphs[0]
