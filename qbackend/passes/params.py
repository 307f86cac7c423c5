"""Which nodes of a Dynamo graph are module parameters/buffers, their real tensors and their names.

Dynamo hands the backend parameters as placeholders (``inline_inbuilt_nn_modules``) whose
``_dynamo_source`` says where they came from and whose ``meta["grapharg"].example`` is the real
tensor; with Inductor freezing on (set before tracing) they are ``get_attr`` attributes of the
GraphModule instead. Graph inputs that are not module state (activations, tensors passed as
arguments) are not parameters: their value can change every call.

This module only reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo import source as dsrc

#: node meta key a qbackend pass puts on a get_attr weight it creates (e.g. a SmoothQuant-scaled
#: weight): the original weight's module path. Other ``_qbackend_*`` attributes are not weights.
WEIGHT_FQN_META = "qbackend_weight_fqn"


@dataclass(frozen=True)
class ParamRef:
    """A parameter (or buffer) as the graph sees it.

    fqn: its name in the user's module, e.g. ``encoder.layer.0.attention.self.query.weight``.
    tensor: the real tensor (the user's own object; never a copy).
    input_index: its position among the graph's placeholders (where the compiled callable receives
        it on every call), or None for a ``get_attr`` attribute.
    """

    fqn: str
    tensor: torch.Tensor
    input_index: int | None


def graph_params(gm: fx.GraphModule) -> dict[fx.Node, ParamRef]:
    """Map each parameter/buffer node of ``gm`` to its `ParamRef`."""
    out: dict[fx.Node, ParamRef] = {}
    flat_to_fqn = gm.meta.get("dynamo_flat_name_to_original_fqn", {}) if hasattr(gm, "meta") else {}
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        src = getattr(node, "_dynamo_source", None)
        grapharg = node.meta.get("grapharg")
        example = getattr(grapharg, "example", None)
        if not isinstance(example, torch.Tensor):
            continue
        from_module = src is not None and dsrc.is_from_unspecialized_param_buffer_source(src)
        if not (from_module or isinstance(example, torch.nn.Parameter)):
            continue
        out[node] = ParamRef(source_fqn(src) if src is not None else str(node.target), example, i)
    for node in gm.graph.find_nodes(op="get_attr"):
        try:
            t = get_attr(gm, node.target)
        except AttributeError:
            continue
        if not isinstance(t, torch.Tensor):
            continue
        fqn = node.meta.get(WEIGHT_FQN_META)
        if fqn is None and str(node.target).startswith("_qbackend_"):
            continue  # quantized tensors a lowering registered: not weights
        out[node] = ParamRef(fqn or flat_to_fqn.get(str(node.target), str(node.target)), t, None)
    return out


def source_fqn(source: object) -> str:
    """Dotted module path of a Dynamo source, e.g. ``L['self']._modules['a']._parameters['weight']`` -> ``a.weight``.

    The root argument (the compiled module, or a module passed to the compiled function; ``args[0]``
    of a decorated ``forward(*args)``) is dropped; the name of a global or closure variable holding
    the module is kept.
    """
    parts: list[str] = []
    s = source
    while s is not None:
        if isinstance(s, (dsrc.DictGetItemSource, dsrc.GetItemSource)):
            base = s.base
            if isinstance(base, dsrc.LocalSource) and base.is_input and base.local_name == "args" and s.index == 0:
                break  # ``L['args'][0]``: the root (a decorated forward, ``wrapper(*args)``, gets ``self`` as args[0])
            parts.append(str(s.index))
            # ``_modules['a']`` / ``_parameters['weight']``: the container attribute is not part of the name.
            if isinstance(base, dsrc.AttrSource) and base.member in ("_modules", "_parameters", "_buffers"):
                base = base.base
            s = base
        elif isinstance(s, dsrc.AttrSource):
            parts.append(s.member)
            s = s.base
        elif isinstance(s, dsrc.GlobalSource):
            parts.append(s.global_name)
            break
        elif isinstance(s, dsrc.LocalSource) and not s.is_input and s.local_name != "fn":
            # a module held by a closure: keep its name ("fn" is torch.compile's own wrapper of the module)
            parts.append(s.local_name)
            break
        elif isinstance(s, dsrc.ChainedSource):
            s = s.base
        else:  # LocalSource and anything unknown: the root
            break
    return ".".join(reversed(parts)) if parts else getattr(source, "name", str(source))


def get_attr(gm: fx.GraphModule, target: object) -> Any:
    """The object a ``get_attr`` node's (dotted) ``target`` names on ``gm``."""
    obj: Any = gm
    for atom in str(target).split("."):
        obj = getattr(obj, atom)
    return obj


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy of a Dynamo GraphModule (passes rewrite in place), with the Dynamo
    metadata passes read: placeholder sources, node meta (shallow), ``gm.meta`` and param sources."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    for old, new in val_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = dict(gm._param_name_to_source)
    return copy
