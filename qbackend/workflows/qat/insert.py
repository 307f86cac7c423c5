"""QAT pass: fake quantization on linear weights (and inputs) while training; their deployment otherwise.

Runs between :func:`select_layers` and :func:`lower_linears` on the linear layers the backend's
finder found. A layer is a QAT layer when its weight was prepared (``qbackend.qat.prepare``: its
state and format win) or, unprepared, when ``config.qat`` is set and the backend selected it.

* Grad enabled: every lowerable site of a QAT layer becomes
  ``linear(fq_act(x), fake_quant_weight(W, ratio), bias)`` (custom ops, exact format numerics,
  straight-through gradients); a static input scale is observed in the same graph. Learnable
  ratios and observer buffers are attributes of the GraphModule that ARE the user's tensors, so AOT
  autograd lifts them as graph inputs: gradients reach ``ratio.grad``, observer updates land in the
  model's buffers, and nothing is baked into the compiled code.
* Grad disabled: QAT layers whose deployment needs QAT information (prepared state or input
  quantization) are lowered here to the quantized op on the deployed weight
  (``qbackend.qat.deployed_weight``), with the same input fake quantization; stateless weight-only
  QAT layers are left to :func:`lower_linears`, whose quantization is the same function.

Invariant: for every rewritten site the graph computes exactly what the eager QAT reference
(``LinearQAT.forward`` / its deployment) computes, bit for bit in the weights; sites of other layers
and all other nodes are unchanged; the graph lints; running the pass again changes nothing (a
rewritten site no longer matches a float linear on a parameter).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from ...formats import Scheme
from ...kernels.compute_policy import resolve_weight
from ...passes.find_linears import LinearSite
from ...passes.graph import attach_tensor, attr_name, become
from ...passes.lowering import BUFFER_PREFIX, Lowered, LoweringResult
from ...passes.report import LayerReport, Report, float_row
from ...passes.select_layers import LayerPlan
from .config import QATConfig
from .deploy import DeployedLinear, get_deployed
from .fake_quant import ACT_QMAX, scheme_key
from .state import LinearQAT, state_of

log = logging.getLogger("qbackend")
aten = torch.ops.aten
_PREFIX = BUFFER_PREFIX + "qat_"


def insert_qat(
    gm: fx.GraphModule, plans: list[LayerPlan], config: Any
) -> tuple[LoweringResult, list[LayerPlan]]:
    """Rewrite the QAT layers of ``gm`` (in place); returns their result and the plans left to lower.

    Deployed layers (grad disabled) run in the config's ``compute`` option resolved per layer, as
    weight-only layers do; training computes in fp32.
    """
    result = LoweringResult(Report(graphs=1))
    if config.qat is None and not any(state_of(p.param.tensor) is not None for p in plans):
        return result, plans
    training = torch.is_grad_enabled()
    rest: list[LayerPlan] = []
    for plan in plans:
        state = state_of(plan.param.tensor)
        scheme = state.scheme if state is not None else plan.scheme if config.qat is not None else None
        sites = [s for s in plan.sites if s.skip_reason is None]
        if scheme is None or not sites:
            rest.append(plan)
            continue
        qat = state.config if state is not None else _stateless(config.qat, plan.name)
        if not training and state is None and qat.activations == "none":
            rest.append(plan)  # deploying == the backend's own lowering of this scheme
            continue
        row = _row(plan, scheme)
        result.report.layers.append(row)
        attrs = _state_attrs(gm, plan.name, state)
        if training:
            wq = _fake_quant_weight(gm.graph, sites[0], scheme, qat, attrs)  # once per weight (tied: shared)
            for site in sites:
                _fake_quant_site(gm.graph, site, wq, qat, attrs)
            row.reason = "QAT: fake-quantized (grad enabled)"
        else:
            entry = get_deployed(plan.param.tensor, scheme, state, plan.transposed, plan.name)
            kw = entry.kw
            device = next(t for t in kw.tensors if t is not None).device.type
            mode = resolve_weight(getattr(config, "compute", "auto"), kw.op._opname, kw.statics, device).mode
            kw_nodes = _register(gm, plan.name, entry)
            for site in sites:
                _deploy_site(gm.graph, site, entry, qat, kw_nodes, attrs, mode)
            result.lowered.append(Lowered(entry, plan.param))
            row.quantized, row.bits_per_param, row.bytes_after = True, entry.bits_per_param, entry.nbytes
            row.compute = mode
        result.nodes += len(sites)
    if result.nodes:
        gm.graph.lint()
        gm.recompile()
    return result, rest


# ---- per-site rewrites ---------------------------------------------------------------------------


def _fake_quant_weight(graph: fx.Graph, first: LinearSite, scheme: Scheme, qat: QATConfig, attrs: dict) -> fx.Node:
    """The fake-quantized [out, in] weight, placed before the layer's first site (sites are in graph order)."""
    with graph.inserting_before(first.node):
        w = graph.call_function(aten.t.default, (first.weight,)) if first.transposed else first.weight
        return graph.call_function(
            torch.ops.qbackend.qat_fake_quant_weight.default,
            (w, attrs.get("weight_ratio"), scheme_key(scheme), float(qat.min_ratio)),
        )


def _fake_quant_site(graph: fx.Graph, site: LinearSite, wq: fx.Node, qat: QATConfig, attrs: dict) -> None:
    with graph.inserting_before(site.node):
        x = _act(graph, site.x, qat, attrs, observe=True)
    become(graph, site, aten.linear.default, (x, wq, site.bias))


def _deploy_site(
    graph: fx.Graph, site: LinearSite, entry: DeployedLinear, qat: QATConfig, kw_nodes: list, attrs: dict,
    compute: str,
) -> None:  # fmt: skip
    with graph.inserting_before(site.node):
        x = _act(graph, site.x, qat, attrs, observe=False)
    become(graph, site, entry.kw.op, (x, *kw_nodes, site.bias, *entry.kw.statics, compute))


def _act(graph: fx.Graph, x: fx.Node, qat: QATConfig, attrs: dict, observe: bool) -> fx.Node:
    """The (fake-)quantized input node for ``qat.activations``."""
    fq = torch.ops.qbackend.qat_fake_quant_act.default
    if qat.activations == "dynamic":
        return graph.call_function(fq, (x, None))
    if qat.activations != "static" or "act_absmax" not in attrs:
        return x
    if observe:
        xd = graph.call_function(aten.detach.default, (x,))
        scale = graph.call_function(
            torch.ops.qbackend.qat_observe_absmax.default,
            (xd, attrs["act_absmax"], attrs["act_observed"], attrs["observing"], float(qat.observer_momentum)),
        )
    else:
        scale = graph.call_function(aten.div.Tensor, (attrs["act_absmax"], ACT_QMAX))
    return graph.call_function(fq, (x, scale))


# ---- graph attributes: the user's QAT state and the deployed kernel tensors ------------------------


def _state_attrs(gm: fx.GraphModule, layer: str, state: LinearQAT | None) -> dict[str, fx.Node]:
    """get_attr nodes for the layer's state tensors (the model's own Parameter/buffers, not copies)."""
    if state is None:
        return {}
    out = {}
    for name in ("weight_ratio", "act_absmax", "act_observed", "observing"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            out[name] = _attr(gm, f"{layer}_{name}", t)
    return out


def _register(gm: fx.GraphModule, layer: str, entry: DeployedLinear) -> list[fx.Node | None]:
    kw = entry.kw
    return [None if t is None else _attr(gm, f"{layer}_{n}", t) for t, n in zip(kw.tensors, kw.names, strict=True)]


def _attr(gm: fx.GraphModule, name: str, t: torch.Tensor) -> fx.Node:
    return attach_tensor(gm, _PREFIX + attr_name(name), t)


# ---- policy and report ---------------------------------------------------------------------------

_warned: set[str] = set()


def _stateless(qat: QATConfig | None, layer: str) -> QATConfig:
    """The QAT an unprepared layer gets: the stateless part of ``qat`` (no ratios, no static observer)."""
    assert qat is not None
    if qat.stateful and layer not in _warned:
        _warned.add(layer)
        log.warning(
            "qbackend: layer %s has no QAT state (learnable scales / static activations need "
            "qbackend.qat.prepare(model, options) before compiling); it gets stateless fake quantization",
            layer,
        )
    activations = "none" if qat.activations == "static" else qat.activations
    return QATConfig(learnable_scales=False, activations=activations, observer_momentum=qat.observer_momentum)


def _row(plan: LayerPlan, scheme: Scheme) -> LayerReport:
    row = float_row(plan.name, plan.param.fqn, plan.param.tensor, transposed=plan.transposed,
                    forms=tuple(s.form for s in plan.sites))  # fmt: skip
    row.format = scheme.name
    return row
