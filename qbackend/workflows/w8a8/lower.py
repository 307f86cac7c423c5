"""W8A8 lowering: linear sites -> ``qbackend::w8a8_linear`` (or ``w8a8_outlier_linear``).

Weights are int8 per output channel (symmetric), quantized once at compile time from the site's
weight as the graph computes it: the parameter, or the folded ``W * s`` of :mod:`.fold`.
Activations are int8 per token (dynamic) or per tensor with a static scale; with an outlier
threshold, columns reaching it stay float (LLM.int8()).

Invariant: every lowered site computes ``w8a8_linear(x', Q(W'), bias', act_scale)`` where ``x'``,
``W'``, ``bias'`` are what the (folded) float graph feeds that linear; sites not lowered are left as
they are. Float copies of folded weights are dropped from the GraphModule once quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from ...formats import Scheme, quantize
from ...kernels import ops as _kernel_ops  # noqa: F401  (registers qbackend::w8a8_linear, w8a8_outlier_linear)
from ...passes.graph import attach_tensor, attr_name, become
from ...passes.lowering import BUFFER_PREFIX
from ...passes.report import LayerReport
from ...passes.select_layers import LayerPlan
from ...passes.weight_cache import QuantEntry, get_entry
from .fold import FoldReport

W8A8_SCHEME = Scheme("int", 8, symmetric=True, granularity="channel", axis=0)


def mark_quantized(row: LayerReport, n: int, k: int, fmt: str, counted: bool = True) -> None:
    """Fill ``row`` for a W8A8 layer [n, k]: int8 codes + one fp32 scale per output channel (``counted``
    False: a tied weight whose storage another row already counts)."""
    row.quantized, row.format = True, fmt
    row.bits_per_param = 8.0 + 32.0 / k if counted else 0.0
    row.bytes_after = n * k + 4 * n if counted else 0


@dataclass(frozen=True)
class ActQuant:
    """How one layer quantizes its input: static per-tensor ``act_scale`` (None: per token, dynamic)
    and the outlier ``threshold`` (None: no decomposition)."""

    act_scale: torch.Tensor | None = None
    threshold: float | None = None

    @property
    def label(self) -> str:
        act = "act per-tensor static" if self.act_scale is not None else "act per-token"
        return act + (f", outliers >= {self.threshold:g} in float" if self.threshold is not None else "")


@dataclass
class W8A8Lowered:
    """A lowered layer: its plan, activation quantization, the shared entry (unfolded weights only,
    which the backend can re-quantize in place) and the relative weight error (when measured)."""

    plan: LayerPlan
    act: ActQuant
    entry: QuantEntry | None
    rel_error: float | None = None


ActFn = Callable[[LayerPlan], ActQuant]


def lower_w8a8(
    gm: fx.GraphModule, plans: list[LayerPlan], act_fn: ActFn, fold: FoldReport | None = None,
    measure_error: bool = False,
) -> list[W8A8Lowered]:  # fmt: skip
    """Rewrite the lowerable sites of every planned layer of ``gm`` (in place) to the W8A8 op."""
    fold = fold or FoldReport()
    done: list[W8A8Lowered] = []
    for plan in plans:
        sites = plan.lowerable_sites
        if not sites:
            continue
        act = act_fn(plan)
        folded = [fold.weights[s.node] for s in sites if s.node in fold.weights]
        entry = None
        if folded:
            # A folded weight belongs to one site (tied weights are never smoothed).
            w = folded[0].t() if plan.transposed else folded[0]
            qw = quantize(w.float().contiguous(), W8A8_SCHEME, name=plan.name)
            codes, scale = qw.codes.reshape(-1), qw.scale.reshape(-1).float()
        else:
            entry = get_entry(plan.param.tensor, W8A8_SCHEME, plan.transposed, plan.name)
            codes, scale = entry.kw.tensors[0], entry.kw.tensors[1]
        n, k = plan.sites[0].out_features, plan.sites[0].in_features
        attrs = _register(gm, plan.name, {"codes": codes, "scale": scale, "act_scale": act.act_scale})
        for site in sites:
            x = _current(fold, site, site.x)
            bias = _current(fold, site, site.bias) if site.bias is not None else None
            if act.threshold is None:
                target = torch.ops.qbackend.w8a8_linear.default
                args = (x, attrs["codes"], attrs["scale"], bias, attrs["act_scale"], n, k)
            else:
                target = torch.ops.qbackend.w8a8_outlier_linear.default
                args = (x, attrs["codes"], attrs["scale"], bias, attrs["act_scale"], float(act.threshold), n, k)
            become(gm.graph, site, target, args)
        err = None
        if measure_error:
            ref = (folded[0] if folded else plan.param.tensor).detach().float()
            ref = ref.t() if plan.transposed else ref
            deq = codes.view(n, k).float() * scale.view(-1, 1)
            err = float((deq - ref).norm() / ref.norm().clamp(min=1e-30))
        done.append(W8A8Lowered(plan, act, entry, err))
    _drop_unused_constants(gm)
    gm.graph.lint()
    gm.recompile()
    return done


def _current(fold: FoldReport, site, node: fx.Node) -> fx.Node:
    """What the site reads now in place of ``node`` (an explicit multiply, a folded constant)."""
    for reader in (site.node, *site.consumed):
        new = fold.replaced.get((reader, node))
        if new is not None:
            return new
    return node


def _register(gm: fx.GraphModule, layer: str, tensors: dict[str, torch.Tensor | None]) -> dict[str, fx.Node | None]:
    prefix = BUFFER_PREFIX + "w8a8_"
    return {k: None if t is None else attach_tensor(gm, prefix + attr_name(layer, k), t) for k, t in tensors.items()}


def _drop_unused_constants(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes nobody reads and free their buffers (the folded float weights)."""
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if node.users or not str(node.target).startswith(BUFFER_PREFIX):
            continue
        target = str(node.target)
        gm.graph.erase_node(node)
        if not any(n.target == target for n in gm.graph.find_nodes(op="get_attr")) and target in gm._buffers:
            del gm._buffers[target]
            getattr(gm, "_param_name_to_source", {}).pop(target, None)
