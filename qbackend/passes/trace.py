"""The one Dynamo graph the backend would receive for ``model(example)``, for module forms that need the dataflow."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._dynamo.eval_frame import remove_from_cache


class TraceError(RuntimeError):
    """The model did not trace as one graph; the message is short (the first line of the cause)."""


def trace_once(model: nn.Module, example: Any) -> fx.GraphModule:
    """The Dynamo graph of ``model(example)`` (parameters as placeholders); raises `TraceError`.

    ``torch.compile(fullgraph=True)`` with a recording backend, as ``torch._dynamo.export`` does it
    (which would also insist on pytree outputs, e.g. no HF ``DynamicCache``): the model's ``forward``
    is dropped from Dynamo's cache before (a fresh trace, never a hit) and after (no entry left behind).
    ``example``: a tensor, a tuple of arguments or a dict of keyword arguments.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def to(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) else v

    if isinstance(example, Mapping):
        args, kwargs = (), {k: to(v) for k, v in example.items()}
    elif isinstance(example, (tuple, list)):
        args, kwargs = tuple(to(v) for v in example), {}
    else:
        args, kwargs = (to(example),), {}
    graphs: list[fx.GraphModule] = []
    graphargs: list[tuple[fx.Node, Any]] = []

    def record(gm: fx.GraphModule, example_inputs: list[Any]):
        graphs.append(gm)
        graphargs.extend((n, n.meta["grapharg"]) for n in gm.graph.find_nodes(op="placeholder") if "grapharg" in n.meta)
        return gm.forward

    remove_from_cache(model)
    try:
        with torch.no_grad():
            torch.compile(model, backend=record, fullgraph=True)(*args, **kwargs)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0]
        raise TraceError(f"{type(e).__name__}: {msg}") from e
    finally:
        remove_from_cache(model)
    if len(graphs) != 1:
        raise TraceError(f"tracing the model gave {len(graphs)} graphs, not one")
    for node, grapharg in graphargs:  # Dynamo drops them once compiled; graph_params reads them
        node.meta["grapharg"] = grapharg
    return graphs[0]
