"""Channel folding pass: move per-input-channel scales s from activations into weights, offline.

Entry point: :func:`channel_fold`; used by SmoothQuant (``qbackend.workflows.w8a8.fold``) and AWQ
(``qbackend.workflows.weight_only.awq_fold``).

INVARIANT: for any positive, finite s per group, the rewritten graph computes the same
function as the original (up to float rounding). Each scaled linear's weight W (as [N, K]) becomes
``W * s`` (scaled along its input channels) and its input ``x`` becomes ``x / s``; the latter is

* folded exactly into the producer of ``x`` when only the group consumes it: a LayerNorm/RMSNorm
  (weight and bias divided by s), an elementwise multiply by a per-channel parameter (LlamaRMSNorm's
  ``weight * h``: the parameter divided by s), or the output rows and bias of the previous linear,
  walking back only through ops that treat each channel separately and linearly (views keeping the
  last dim, dropout, dtype casts, an elementwise multiply with another operand);
* otherwise an explicit ``x * (1/s)`` inserted before the linears (``unfoldable="multiply"``) or no
  scaling at all (``unfoldable="skip"``), reported with the reason: a residual add, a non-linear op
  such as GELU, or a producer that also feeds other ops (BERT's post-LN residual).

Nothing is folded through a non-linear op. Linears sharing one input (q/k/v, gate/up) form one group;
an exact fold gives the group one s (``scale_fn`` sees all the group's weights). With an explicit
multiply, each linear gets its own s and multiply (``explicit="per_layer"``) or the group shares one
(``explicit="shared"``). ``scale_weights=False`` leaves the group's own weights unscaled (the caller
quantizes ``W * s`` itself, as AWQ does); producers are still folded.

The user's parameters are never modified: folded values are new buffers read only by the rewritten
consumers. Groups are processed from last to first, so a linear whose output rows absorbed a later
group's s is scaled with its already-folded weight. Idempotent per ``meta_key``: a second call
returns the first report unchanged.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.fx as fx

from .find_linears import LinearSite, find_linears
from .graph import attach_tensor
from .lowering import BUFFER_PREFIX
from .params import ParamRef, graph_params
from .weight_cache import StaleWeightError
from .weight_stamp import FoldedCheck

FoldKind = Literal["layer_norm", "rms_norm", "param_mul", "linear_rows", "multiply", "skipped"]
EXACT_KINDS: tuple[str, ...] = ("layer_norm", "rms_norm", "param_mul", "linear_rows")
REPORT_META = "qbackend_channel_fold"
#: meta key on every node the pass inserts (explicit multiplies, folded constants)
NODE_META = "qbackend_channel_fold_node"

_LAYER_NORMS = (torch.nn.functional.layer_norm, torch.layer_norm)
_RMS_NORMS = (torch.rms_norm, torch.nn.functional.rms_norm)
_MULS = (operator.mul, torch.mul)
_DIVS = (operator.truediv, torch.div)
_SUMS = (operator.add, torch.add, operator.sub, torch.sub)
_VIEW_METHODS = ("view", "reshape", "flatten", "unsqueeze", "squeeze", "expand", "contiguous", "clone")
_CAST_METHODS = ("to", "type", "float", "half", "bfloat16", "double", "detach")
_VIEW_FNS = (torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze, torch.clone)
_DROPOUTS = (torch.nn.functional.dropout, torch.dropout)


class ChannelScale(Protocol):
    """What ``scale_fn`` returns: ``s`` (per input channel; None: leave the group unscaled). Reports
    also show ``alpha`` and ``searched`` when the object has them."""

    s: torch.Tensor | None


@dataclass
class SmoothGroup:
    """Linears sharing one input, as the scale callback sees them.

    weights: their current [N, K] weights (rows already scaled by a later group's fold included).
    """

    sites: list[LinearSite]
    weights: list[torch.Tensor]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.layer_name for s in self.sites)

    @property
    def in_features(self) -> int:
        return int(self.weights[0].shape[1])


#: returns the group's scale, or a reason (str) to leave the group unscaled.
ScaleFn = Callable[[SmoothGroup], "Any | str"]


@dataclass
class GroupFold:
    """One group's outcome: ``kind`` is the fold used ("multiply": explicit runtime multiply;
    "skipped": not smoothed); ``target`` what absorbed s; ``reason`` why no exact fold.

    params: exact folds only, the parameters (names) that absorbed 1/s: the norm's weight and bias,
    the multiplied parameter, the producing linear's weight and bias. ``adds_weight``: a norm without
    an affine weight was given one (1/s), which no parameter of the model holds. Read by the W8A8
    module form (:mod:`.module_form`), which does the same folds on modules.
    """

    layers: tuple[str, ...]
    kind: FoldKind
    target: str = ""
    reason: str = ""
    choice: Any = None  # the scale_fn's ChannelScale
    params: tuple[str, ...] = ()
    adds_weight: bool = False

    @property
    def exact(self) -> bool:
        return self.kind in EXACT_KINDS


@dataclass
class FoldReport:
    """Per-group outcomes, plus what the W8A8 lowering needs to read the rewritten graph.

    weights: site node -> the site's folded weight in the parameter's layout (sites not listed
        read their parameter unchanged). replaced: (reader node, original input) -> new input node.
    sources: the parameters whose values were folded into constants (a later in-place change of one
    makes the constants stale: the backend checks them).
    """

    groups: list[GroupFold] = field(default_factory=list)
    weights: dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    replaced: dict[tuple[fx.Node, fx.Node], fx.Node] = field(default_factory=dict)
    sources: list[ParamRef] = field(default_factory=list)

    def by_kind(self, *kinds: str) -> list[GroupFold]:
        return [g for g in self.groups if g.kind in kinds]

    @property
    def exact(self) -> list[GroupFold]:
        return self.by_kind(*EXACT_KINDS)

    @property
    def explicit(self) -> list[GroupFold]:
        return self.by_kind("multiply")

    @property
    def skipped(self) -> list[GroupFold]:
        return self.by_kind("skipped")

    def scale_of(self, layer: str) -> torch.Tensor | None:
        """The s applied to ``layer``'s input (None: not smoothed)."""
        for g in self.groups:
            if layer in g.layers and g.kind != "skipped" and g.choice is not None:
                return g.choice.s
        return None

    def table(self) -> str:
        lines = []
        for g in self.groups:
            alpha = ""
            a = getattr(g.choice, "alpha", None)
            if a is not None:
                alpha = f" alpha={a:g}{' (searched)' if getattr(g.choice, 'searched', False) else ''}"
            where = f" -> {g.target}" if g.target else ""
            why = f" ({g.reason})" if g.reason else ""
            lines.append(f"{'/'.join(g.layers)}: {g.kind}{where}{alpha}{why}")
        return "\n".join(lines)


def channel_fold(
    gm: fx.GraphModule,
    scale_fn: ScaleFn,
    *,
    unfoldable: str = "multiply",
    explicit: str = "per_layer",
    sites: list[LinearSite] | None = None,
    scale_weights: bool = True,
    fold_exact: bool = True,
    meta_key: str = REPORT_META,
    tag: str = "fold",
) -> FoldReport:
    """Scale every linear group of ``gm`` (in place) with the s ``scale_fn`` returns.

    unfoldable: "multiply" or "skip" where no exact fold exists; explicit: "per_layer" or "shared"
    scales for explicit multiplies; sites: the graph's linear sites if already found (default:
    :func:`find_linears`); scale_weights: also scale the group's weights by s (False: the caller
    does); fold_exact: False puts an explicit multiply (one s for the group) where an exact fold
    exists too, reported with the fold it stands for (to compare the two); meta_key: where
    ``gm.meta`` keeps the report (a second call returns it); tag: names the inserted buffers.
    See the module docstring for the invariant.
    """
    if meta_key in gm.meta:
        return gm.meta[meta_key]
    if unfoldable not in ("multiply", "skip"):
        raise ValueError(f"unfoldable must be 'multiply' or 'skip'; got {unfoldable!r}")
    if explicit not in ("per_layer", "shared"):
        raise ValueError(f"explicit must be 'per_layer' or 'shared'; got {explicit!r}")
    state = _State(gm, find_linears(gm) if sites is None else sites, tag)
    report = FoldReport()
    for group in reversed(_groups(state.sites)):
        report.groups[:0] = state.smooth(group, scale_fn, unfoldable, explicit, scale_weights, fold_exact)
    state.materialise(report)
    gm.meta[meta_key] = report
    return report


# ---- which ops keep channels apart ------------------------------------------------------------


def _val(node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def _last_dim(node: object) -> int | None:
    v = _val(node)
    if v is None or v.dim() == 0 or not isinstance(v.shape[-1], int):
        return None
    return int(v.shape[-1])


def _is_channelwise_unary(node: fx.Node) -> bool:
    """``node`` maps x[..., j] to (a copy of) x[..., j] for every channel j: views and reshapes keeping
    the last dim (row-major order keeps each element's last index), dropout, float casts, transposes
    and indexing of leading dims. Scaling channel j of the input scales channel j of the output."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src = node.args[0]
    sv, out = _val(src), _val(node)
    if sv is None or out is None or not out.is_floating_point():
        return False
    c_in, c_out = _last_dim(src), _last_dim(node)
    if c_in is None or c_in != c_out:
        return False
    t, nd = node.target, sv.dim()
    if node.op == "call_method":
        if t in _VIEW_METHODS or t in _CAST_METHODS:
            return True
        if t == "transpose" and len(node.args) == 3:
            return all(isinstance(d, int) and d % nd != nd - 1 for d in node.args[1:])
        if t == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return bool(dims) and isinstance(dims[-1], int) and dims[-1] % nd == nd - 1
        return False
    if node.op == "call_function":
        if t in _VIEW_FNS or t in _DROPOUTS:
            return True
        if t is operator.getitem:
            return _leading_index(node.args[1], nd)
    return False


def _leading_index(idx: object, ndim: int) -> bool:
    """An index touching only leading dims (ints/slices/None; no Ellipsis, no tensors)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if not all(i is None or isinstance(i, (int, slice)) for i in items):
        return False
    return sum(i is not None for i in items) < ndim


def _root(x: fx.Node) -> fx.Node:
    while _is_channelwise_unary(x):
        x = x.args[0]  # type: ignore[assignment]
    return x


def _groups(sites: list[LinearSite]) -> list[list[LinearSite]]:
    """Sites grouped by the node their input comes from (through channel-wise views), graph order."""
    by_root: dict[fx.Node, list[LinearSite]] = {}
    for s in sites:
        by_root.setdefault(_root(s.x), []).append(s)
    return list(by_root.values())


# ---- the rewrite -----------------------------------------------------------------------------


@dataclass
class _Fold:
    kind: FoldKind
    node: fx.Node  # the producer that absorbs s
    target: str
    site: LinearSite | None = None
    param_arg: int = 0  # param_mul: which operand is the parameter


class _State:
    """Folded values of parameters, keyed by (parameter node, the node reading it): a folded value
    is only ever read by the consumer it was folded for, even if others read the same parameter."""

    def __init__(self, gm: fx.GraphModule, sites: list[LinearSite], tag: str = "fold") -> None:
        self.gm = gm
        self.tag = tag
        self.params: dict[fx.Node, ParamRef] = graph_params(gm)
        self.sites = sites
        self.site_of = {s.node: s for s in sites}
        count: dict[int, int] = {}
        for s in sites:
            count[id(s.param.tensor)] = count.get(id(s.param.tensor), 0) + 1
        self.tied = {i for i, c in count.items() if c > 1}
        self.current: dict[tuple[fx.Node, fx.Node], torch.Tensor] = {}
        self.new_weights: list[tuple[fx.Node, int, torch.Tensor, str]] = []  # norm without weight: (node, idx, w)
        self.replaced: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
        self.counter = 0

    # -- values
    def value(self, p: fx.Node, reader: fx.Node) -> torch.Tensor:
        return self.current.get((p, reader), self.params[p].tensor)

    def scale(self, p: fx.Node, reader: fx.Node, s: torch.Tensor, dim: int, inverse: bool) -> None:
        self.current[(p, reader)] = _scaled(self.value(p, reader), s, dim, inverse)

    def _weight_reader(self, site: LinearSite) -> fx.Node:
        return next(n for n in (site.node, *site.consumed) if site.weight in n.all_input_nodes)

    def site_weight(self, site: LinearSite) -> torch.Tensor:
        w = self.value(site.weight, self._weight_reader(site))
        return w.t() if site.transposed else w

    # -- one group
    def smooth(
        self, sites: list[LinearSite], scale_fn: ScaleFn, unfoldable: str, explicit: str, scale_weights: bool = True,
        fold_exact: bool = True,
    ) -> list[GroupFold]:
        names = tuple(s.layer_name for s in sites)
        tied = [s.layer_name for s in sites if id(s.param.tensor) in self.tied]
        if tied:
            return [GroupFold(names, "skipped", reason=f"weight shared by several linears ({', '.join(tied)})")]
        fold = self._find_fold(sites)
        if isinstance(fold, str) and unfoldable == "skip":
            return [GroupFold(names, "skipped", reason=f"no exact fold: {fold}")]
        per_layer = isinstance(fold, str) and explicit == "per_layer"
        if not fold_exact and not isinstance(fold, str):
            fold = f"exact fold {fold.kind} -> {fold.target} not applied (fold_exact=False)"
        parts = [[s] for s in sites] if per_layer else [sites]
        out = []
        for part in parts:
            part_names = tuple(s.layer_name for s in part)
            choice = scale_fn(SmoothGroup(part, [self.site_weight(s) for s in part]))
            if isinstance(choice, str):
                out.append(GroupFold(part_names, "skipped", reason=choice))
                continue
            s = self._checked(choice, part)
            if isinstance(fold, str):
                self._explicit(part, s)
                out.append(GroupFold(part_names, "multiply", "", fold, choice))
            else:
                params, adds_weight = self._apply(fold, s)
                out.append(GroupFold(part_names, fold.kind, fold.target, "", choice, params, adds_weight))
            for site in part if scale_weights else ():  # W * s along input channels
                self.scale(site.weight, self._weight_reader(site), s, dim=0 if site.transposed else 1, inverse=False)
        return out

    @staticmethod
    def _checked(choice: Any, sites: list[LinearSite]) -> torch.Tensor:
        k = sites[0].in_features
        s = None if choice.s is None else choice.s.detach().cpu().double().reshape(-1)
        if s is None or s.numel() != k or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            names = [x.layer_name for x in sites]
            raise ValueError(f"smoothing scale of {names} must be {k} finite positive values; got {choice.s}")
        return s

    def _find_fold(self, sites: list[LinearSite]) -> _Fold | str:
        # Every node from the producer to the group must feed only the group, else others see x/s.
        root = _root(sites[0].x)
        ours: set[fx.Node] = {n for s in sites for n in (s.node, *s.consumed)}
        between: set[fx.Node] = set()
        for s in sites:
            n = s.x
            while n is not root:
                between.add(n)
                n = n.args[0]  # type: ignore[assignment]
        for n in [root, *between]:
            others = [u for u in n.users if u not in ours and u not in between]
            if others:
                return f"{_describe(n)} also feeds {', '.join(_describe(u) for u in others)}"
        return self._fold_at(root, _last_dim(sites[0].x))

    def _fold_at(self, node: fx.Node, channels: int | None) -> _Fold | str:
        """The exact fold into ``node`` (whose users are all known to be ours), or why there is none."""
        t = node.target
        if node.op == "call_function" and t in _LAYER_NORMS + _RMS_NORMS:
            kind: FoldKind = "layer_norm" if t in _LAYER_NORMS else "rms_norm"
            w = _arg(node, 2, "weight")
            b = _arg(node, 3, "bias") if kind == "layer_norm" else None
            for p in (w, b):
                if p is not None and (not isinstance(p, fx.Node) or p not in self.params):
                    return f"{_describe(node)} has a weight/bias that is not a parameter"
            return _Fold(kind, node, self._owner(w) if isinstance(w, fx.Node) else _describe(node))
        if node in self.site_of:
            site = self.site_of[node]
            if id(site.param.tensor) in self.tied:
                return f"the producing linear {site.layer_name} has a shared weight"
            if _last_dim(node) != site.out_features:
                return f"the producing linear {site.layer_name} has a reshaped output"
            if site.bias is not None and site.bias not in self.params:
                return f"the producing linear {site.layer_name} has a bias that is not a parameter"
            return _Fold("linear_rows", node, site.layer_name, site=site)
        if node.op == "call_function" and t in _MULS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            for i, p in enumerate((a, b)):
                if self._is_channel_param(p, channels):
                    return _Fold("param_mul", node, self._owner(p), param_arg=i)  # type: ignore[arg-type]
            reasons = []
            for mine, other in ((a, b), (b, a)):
                # Elementwise: scaling one operand per channel scales the product, whatever the other is.
                if not isinstance(mine, fx.Node) or mine is other or _last_dim(mine) != channels:
                    continue
                if set(mine.users) != {node}:
                    reasons.append(f"{_describe(mine)} also feeds other ops")
                    continue
                inner = self._descend(mine, channels)
                if not isinstance(inner, str):
                    return inner
                reasons.append(inner)
            return f"{_describe(node)}: " + ("; ".join(reasons) or "no operand carries the channels")
        if node.op == "call_function" and t in _DIVS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if isinstance(a, fx.Node) and _constant_along_channels(b) and set(a.users) == {node}:
                return self._descend(a, channels)
        if t in _SUMS:
            return f"{_describe(node)} is a sum (residual): both branches would need scaling"
        if t in ("view", "reshape", torch.reshape):
            return f"{_describe(node)} changes the channel dim (e.g. merges attention heads); not traced through"
        if node.op in ("placeholder", "get_attr"):
            return f"{_describe(node)} is a graph input: nothing in the graph produces it"
        return f"{_describe(node)} is not linear per channel"

    def _descend(self, node: fx.Node, channels: int | None) -> _Fold | str:
        while _is_channelwise_unary(node):
            nxt = node.args[0]
            assert isinstance(nxt, fx.Node)
            if set(nxt.users) != {node}:
                return f"{_describe(nxt)} also feeds other ops"
            node = nxt
        return self._fold_at(node, channels)

    def _is_channel_param(self, p: object, channels: int | None) -> bool:
        if not isinstance(p, fx.Node) or p not in self.params or channels is None:
            return False
        shape = tuple(self.params[p].tensor.shape)
        return len(shape) >= 1 and shape[-1] == channels and all(d == 1 for d in shape[:-1])

    def _owner(self, p: fx.Node) -> str:
        fqn = self.params[p].fqn
        return fqn.rsplit(".", 1)[0] if fqn.endswith((".weight", ".bias")) else fqn

    def _apply(self, fold: _Fold, s: torch.Tensor) -> tuple[tuple[str, ...], bool]:
        """Fold 1/s into ``fold``'s producer; returns (names of the parameters scaled, whether a
        norm without an affine weight was given one)."""
        node = fold.node
        scaled: list[fx.Node] = []
        adds_weight = False
        if fold.kind in ("layer_norm", "rms_norm"):
            for idx, name in ((2, "weight"), (3, "bias")) if fold.kind == "layer_norm" else ((2, "weight"),):
                p = _arg(node, idx, name)
                if isinstance(p, fx.Node):
                    self.scale(p, node, s, dim=-1, inverse=True)
                    scaled.append(p)
                elif name == "weight":  # no affine weight: the fold gives it one, 1/s
                    self.new_weights.append((node, idx, _like(1.0 / s, _val(node)), f"{fold.target}.weight"))
                    adds_weight = True
        elif fold.kind == "param_mul":
            p = node.args[fold.param_arg]
            assert isinstance(p, fx.Node)
            self.scale(p, node, s, dim=-1, inverse=True)
            scaled.append(p)
        else:
            site = fold.site
            assert site is not None
            self.scale(site.weight, self._weight_reader(site), s, dim=1 if site.transposed else 0, inverse=True)
            scaled.append(site.weight)
            if site.bias is not None:
                self.scale(site.bias, site.node, s, dim=-1, inverse=True)
                scaled.append(site.bias)
        return tuple(self.params[p].fqn for p in scaled), adds_weight

    def _explicit(self, sites: list[LinearSite], s: torch.Tensor) -> None:
        """``x * (1/s)`` once per distinct input node, read only by the group's linears."""
        for x in dict.fromkeys(site.x for site in sites):
            inv = _like(1.0 / s, _val(x))
            const = self._const(inv, f"{sites[0].layer_name}.smooth_inv_scale")
            readers = [r for site in sites for r in (site.node, *site.consumed) if x in r.all_input_nodes]
            order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
            # Right before the first reader: after both x and the constant (which precedes every call).
            with self.gm.graph.inserting_before(min(readers, key=order.__getitem__)):
                mul = self.gm.graph.call_function(operator.mul, (x, const))
            mul.meta.update({k: x.meta[k] for k in ("example_value", "val") if k in x.meta})
            mul.meta[NODE_META] = "explicit smoothing multiply"
            for reader in readers:
                reader.replace_input_with(x, mul)
                self.replaced[(reader, x)] = mul

    def _const(self, value: torch.Tensor, label: str) -> fx.Node:
        name = f"{BUFFER_PREFIX}{self.tag}_{self.counter}_{re.sub(r'[^0-9a-zA-Z_]', '_', label)}"[:160]
        self.counter += 1
        node = attach_tensor(self.gm, name, value.contiguous())
        node.meta["example_value"] = value
        node.meta[NODE_META] = f"folded {label}"
        return node

    def materialise(self, report: FoldReport) -> None:
        """Every folded value becomes a constant read only by the consumer it was folded for."""
        for (p, reader), value in self.current.items():
            ref = self.params[p]
            const = self._const(value.to(ref.tensor.dtype), ref.fqn)
            reader.replace_input_with(p, const)
            self.replaced[(reader, p)] = const
            for site in self.sites:
                if site.weight is p and reader in (site.node, *site.consumed):
                    report.weights[site.node] = value.to(ref.tensor.dtype)
        for node, idx, value, label in self.new_weights:
            const = self._const(value, label)
            if len(node.args) > idx:
                node.args = (*node.args[:idx], const, *node.args[idx + 1 :])
            else:
                node.kwargs = {**node.kwargs, "weight": const}
        report.replaced = dict(self.replaced)
        report.sources = list({id(self.params[p].tensor): self.params[p] for p, _ in self.current}.values())
        self.gm.graph.lint()
        self.gm.recompile()


def _scaled(t: torch.Tensor, s: torch.Tensor, dim: int, inverse: bool) -> torch.Tensor:
    """``t`` times (or divided by) s along ``dim``, computed in float64, in t's dtype."""
    shape = [1] * t.dim()
    shape[dim] = -1
    sv = s.to(t.device).reshape(shape)
    out = t.detach().double() / sv if inverse else t.detach().double() * sv
    return out.to(t.dtype)


def _like(t: torch.Tensor, example: torch.Tensor | None) -> torch.Tensor:
    """``t`` in the dtype and on the device of ``example`` (a node's example value), else fp32 CPU."""
    if example is None:
        return t.float()
    return t.to(dtype=example.dtype, device=example.device)


def _constant_along_channels(x: object) -> bool:
    return isinstance(x, (int, float)) or _last_dim(x) == 1


def _arg(node: fx.Node, i: int, name: str) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _describe(node: fx.Node) -> str:
    t = node.target
    op = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return f"{node.name} ({op})"


def guard_folded(sources: list[ParamRef], weight_check: str, compiled: Callable, what: str) -> Callable:
    """Wrap ``compiled`` with a per-call check that no parameter folded into constants changed.

    Folded constants (``W * s``, norm weights / s) cannot be refreshed from one parameter alone, so
    a change (or ``qbackend.refresh``) raises `StaleWeightError`: recompile. ``what`` names the
    method in the message (e.g. "SmoothQuant").
    """
    checks = [(FoldedCheck(r.fqn, r.tensor, weight_check), r.input_index, r.tensor if r.input_index is None else None)
              for r in sources]  # fmt: skip
    if not checks:
        return compiled

    def run(*args: Any) -> Any:
        for fc, idx, held in checks:
            p = args[idx] if idx is not None else held
            if not fc.ok(p, weight_check):
                raise StaleWeightError(
                    f"qbackend: parameter {fc.name!r} was changed in place after compiling, but {what} folded "
                    "it into constants; recompile (torch._dynamo.reset()) to use the new value"
                )
        return compiled(*args)

    return run
