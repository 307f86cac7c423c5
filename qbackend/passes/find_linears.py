"""Find the linear layers of a graph, in every form model code writes them.

Forms (Dynamo IR, and the aten IR of make_fx/AOT graphs):

* ``linear``: ``nn.Linear`` / ``F.linear`` (``torch._C._nn.linear``, ``aten.linear``)
* ``matmul``: ``x @ w.t()``, ``x @ w.T``, ``torch.matmul(x, w.transpose(0, 1))`` (any N-D ``x``)
* ``mm`` / ``addmm``: ``torch.mm(x, w.t())``, ``torch.addmm(b, x, w.permute(1, 0))`` (2-D ``x``)
* a parameter stored ``[in, out]`` and used untransposed (``x @ w``, GPT-2's ``Conv1D`` addmm): the
  linear's weight is ``w.t()`` (``LinearSite.transposed``)
* ``... + b`` right after a bias-less matmul, with ``b`` of shape ``[out]``: fused as the bias (form
  gets a ``+bias`` suffix)

Only products whose weight is a module parameter/buffer are linear layers (``q @ k.transpose``
is not). A site found but not lowerable carries ``skip_reason``.

Invariant: read-only (the graph is not modified); every site satisfies
``value(site.node) == F.linear(x, W, bias)`` with ``W = param`` (or ``param.t()`` when transposed).
"""

from __future__ import annotations

import builtins
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .params import ParamRef, graph_params

aten = torch.ops.aten

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear, aten.linear.default}
_MATMUL = {operator.matmul, torch.matmul, aten.matmul.default}
_MM = {torch.mm, aten.mm.default}
_ADDMM = {torch.addmm, aten.addmm.default}
_ADD = {operator.add, torch.add, aten.add.Tensor}
_T = {torch.t, aten.t.default, torch.Tensor.t}
_TRANSPOSE = {torch.transpose, aten.transpose.int, torch.swapaxes, torch.swapdims, torch.Tensor.transpose}
_PERMUTE = {torch.permute, aten.permute.default, torch.Tensor.permute}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Calls that do linear layers internally but are opaque here: (argument index, name) of their weights,
# or None for "any 2-D parameter argument" (matmul-like ops this pass does not rewrite). Reported, not lowered.
_OPAQUE = {
    torch.nn.functional.multi_head_attention_forward: ((5, "in_proj_weight"), (11, "out_proj_weight")),
    torch.einsum: None,
    torch.functional.einsum: None,
    torch.tensordot: None,
    torch.bmm: None,
    torch.baddbmm: None,
}


@dataclass
class LinearSite:
    """One linear computation ``node = x @ W^T (+ bias)`` with ``W`` from a parameter.

    node: the node whose value the site computes (replaced by the lowering).
    form: how the code wrote it: "linear", "matmul", "mm", "addmm" (+ "+bias" when an add was fused).
    x: the activation node ``[..., in_features]``.
    weight: the parameter node; ``param`` its tensor and name.
    transposed: the parameter is stored ``[in, out]``: ``W = param.t()``.
    bias: a ``[out_features]`` node or None.
    consumed: nodes the site replaces besides ``node`` (the matmul under a fused add, the transpose).
    skip_reason: why this site cannot be lowered (None: it can).
    """

    node: fx.Node
    form: str
    x: fx.Node
    weight: fx.Node
    param: ParamRef
    transposed: bool
    bias: fx.Node | None = None
    consumed: list[fx.Node] = field(default_factory=list)
    skip_reason: str | None = None

    @property
    def out_features(self) -> int:
        return self.param.tensor.shape[1 if self.transposed else 0]

    @property
    def in_features(self) -> int:
        return self.param.tensor.shape[0 if self.transposed else 1]

    @property
    def layer_name(self) -> str:
        """The module name: the ``nn.Linear``/``Conv1D`` module making the call (a tied weight is named after
        its user, e.g. ``lm_head``, not the embedding that owns it), else the parameter's name without
        ``.weight``."""
        return _calling_module(self.node) or layer_name(self.param.fqn)


def layer_name(param_fqn: str) -> str:
    return param_fqn.removesuffix(".weight") if param_fqn != "weight" else param_fqn


def _calling_module(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, typ = list(stack.values())[-1]
    is_linear = isinstance(typ, type) and (issubclass(typ, torch.nn.Linear) or typ.__name__ == "Conv1D")
    if not is_linear or not isinstance(path, str):
        return None
    # "L['self'].blocks.0.q" -> "blocks.0.q" (the compiled module is the root); "G['lin']" -> "lin";
    # "L['args'][0].blocks.0.q" -> "blocks.0.q" (a decorated forward, e.g. transformers 5's LlamaModel,
    # receives the module as args[0])
    m = re.match(r"^(L|G)\['([^']*)'\]\.?(.*)$", path)
    if m is None:
        return path or None
    root, name, rest = m.groups()
    if root == "G":
        return f"{name}.{rest}" if rest else name
    if name == "args" and rest.startswith("[0]"):
        rest = rest.removeprefix("[0]").removeprefix(".")
    return rest or None


def find_linears(gm: fx.GraphModule) -> list[LinearSite]:
    """All linear sites of ``gm`` whose weight is a parameter, in graph order (read-only)."""
    params = graph_params(gm)
    sites: list[LinearSite] = []
    fused: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node in fused:
            continue
        if node.op == "call_function" and node.target in _OPAQUE:
            sites.extend(_opaque_sites(node, params))
            continue
        site = _match(node, params)
        if site is None:
            continue
        if site.bias is None and site.skip_reason is None:
            add = _fusable_bias_add(site)
            if add is not None:
                add_node, bias = add
                site.consumed.insert(0, site.node)
                site.node, site.bias, site.form = add_node, bias, site.form + "+bias"
                fused.add(add_node)
        if site.skip_reason is None:
            site.skip_reason = _check(site)
        sites.append(site)
    return sites


# ---- matching -----------------------------------------------------------------------------------


def _match(node: fx.Node, params: dict[fx.Node, ParamRef]) -> LinearSite | None:
    if node.op not in ("call_function", "call_method"):
        return None
    kind = _kind(node)
    if kind is None:
        return None
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if kind == "linear":
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        wref = _weight(w, params, direct_is_transposed=False)
        if wref is None:
            return None
        return _site(node, "linear", x, wref, params, bias)
    if kind in ("matmul", "mm"):
        if len(args) != 2 or kwargs:
            return None
        wref = _weight(args[1], params, direct_is_transposed=True)
        if wref is None:
            return None
        return _site(node, kind, args[0], wref, params, None)
    # addmm(input, mat1, mat2, *, beta=1, alpha=1)
    if len(args) < 3:
        return None
    wref = _weight(args[2], params, direct_is_transposed=True)
    if wref is None:
        return None
    site = _site(node, "addmm", args[1], wref, params, args[0])
    if site is not None and (len(args) > 3 or any(kwargs.get(k, 1) != 1 for k in ("beta", "alpha"))):
        site.skip_reason = "addmm with beta/alpha != 1"
    return site


def _opaque_sites(node: fx.Node, params: dict[fx.Node, ParamRef]) -> list[LinearSite]:
    """Weights used inside an opaque call: reported as layers that stay float (never silently skipped)."""
    fn = getattr(node.target, "__name__", str(node.target))
    spec = _OPAQUE[node.target]
    if spec is None:
        args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        weights = [a for a in args if a in params and params[a].tensor.dim() == 2]
        reason = f"used by {fn} (not recognized as a linear layer)"
    else:
        weights = [node.args[i] if len(node.args) > i else node.kwargs.get(name) for i, name in spec]
        reason = f"used inside {fn} (not decomposed into a linear)"
    x = next((a for a in node.args if isinstance(a, fx.Node) and a not in params), None)
    out = []
    for w in weights:
        if isinstance(w, fx.Node) and w in params and params[w].tensor.dim() == 2 and x is not None:
            out.append(LinearSite(node, fn, x, w, params[w], False, skip_reason=reason))
    return out


def _kind(node: fx.Node) -> str | None:
    t = node.target
    if node.op == "call_method":
        return {"matmul": "matmul", "__matmul__": "matmul", "mm": "mm", "addmm": "addmm"}.get(str(t))
    if t in _LINEAR:
        return "linear"
    if t in _MATMUL:
        return "matmul"
    if t in _MM:
        return "mm"
    if t in _ADDMM:
        return "addmm"
    return None


def _weight(
    w: object, params: dict[fx.Node, ParamRef], direct_is_transposed: bool
) -> tuple[fx.Node, bool, fx.Node | None] | None:
    """(param node, transposed, transpose node) if ``w`` is a 2-D parameter or its transpose.

    ``direct_is_transposed``: in ``x @ B`` the operand is ``W^T``, so a parameter used as is means the
    layer's weight is its transpose; in ``linear(x, W)`` it is the weight itself.
    """
    if not isinstance(w, fx.Node):
        return None
    if w in params and params[w].tensor.dim() == 2:
        return w, direct_is_transposed, None
    if _is_transpose(w):
        p = w.args[0]
        if isinstance(p, fx.Node) and p in params and params[p].tensor.dim() == 2:
            return p, not direct_is_transposed, w
    return None


def _is_transpose(n: fx.Node) -> bool:
    """``w.t()``, ``w.T``, ``w.mT``, ``w.transpose(0, 1)``, ``w.permute(1, 0)`` (and aten forms) of a 2-D tensor."""
    if n.op == "call_method":
        name, rest = str(n.target), list(n.args[1:])
        if name == "t" and not rest:
            return True
        if name in ("transpose", "swapaxes", "swapdims"):
            return _swaps01(rest)
        if name == "permute":
            return _perm10(rest)
        return False
    if n.op != "call_function":
        return False
    if n.target is builtins.getattr:
        return len(n.args) == 2 and n.args[1] in ("T", "mT")
    rest = list(n.args[1:])
    if n.target in _T:
        return not rest
    if n.target in _TRANSPOSE:
        return _swaps01(rest)
    if n.target in _PERMUTE:
        return _perm10(rest)
    return False


def _swaps01(dims: list) -> bool:
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % 2 for d in dims} == {0, 1}


def _perm10(dims: list) -> bool:
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and [d % 2 for d in dims] == [1, 0]


def _site(
    node: fx.Node,
    form: str,
    x: object,
    wref: tuple[fx.Node, bool, fx.Node | None],
    params: dict[fx.Node, ParamRef],
    bias: object,
) -> LinearSite | None:
    if not isinstance(x, fx.Node):
        return None
    w, transposed, tnode = wref
    if bias is not None and not isinstance(bias, fx.Node):
        return None  # a Python-number "bias" is not a linear layer
    site = LinearSite(node, form, x, w, params[w], transposed, bias, [tnode] if tnode is not None else [])
    return site


def _fusable_bias_add(site: LinearSite) -> tuple[fx.Node, fx.Node] | None:
    """``site.node + b`` (or ``b + site.node``) with ``b`` [out_features], same dtype, as the only use."""
    users = list(site.node.users)
    if len(users) != 1:
        return None
    add = users[0]
    is_add = (add.op == "call_function" and add.target in _ADD) or (add.op == "call_method" and add.target == "add")
    if not is_add or len(add.args) != 2 or add.kwargs:
        return None
    a, b = add.args
    other = b if a is site.node else a
    if not isinstance(other, fx.Node) or other is site.node:
        return None
    ov, yv, av = _val(other), _val(site.node), _val(add)
    if ov is None or yv is None or av is None:
        return None
    if ov.dim() != 1 or not statically_known_true(ov.shape[0] == site.out_features):
        return None
    if ov.dtype != yv.dtype or av.dtype != yv.dtype or av.dim() != yv.dim():
        return None
    return add, other


def _check(site: LinearSite) -> str | None:
    """Why the site cannot run as ``op(x, W, bias)`` exactly (None if it can)."""
    w = site.param.tensor
    if w.dtype not in _FLOATS:
        return f"weight dtype {w.dtype} is not a float type"
    xv, yv = _val(site.x), _val(site.node)
    if xv is None or yv is None:
        return "no shape information for this node"
    if not isinstance(xv, torch.Tensor) or xv.dim() < 1:
        return "input is not a tensor with a feature dimension"
    if not statically_known_true(xv.shape[-1] == site.in_features):
        return f"input's last dimension is not in_features={site.in_features}"
    if site.form.startswith(("mm", "addmm")) and xv.dim() != 2:
        return "mm/addmm input is not 2-D"
    if xv.dtype != w.dtype or yv.dtype != xv.dtype:
        # e.g. inside an autocast region: the op computes in x's dtype, the graph expects another.
        return f"dtype mismatch: input {xv.dtype}, weight {w.dtype}, output {yv.dtype} (autocast?)"
    if xv.device != w.device:
        return f"input on {xv.device} but weight on {w.device}"
    if site.bias is not None:
        bv = _val(site.bias)
        if bv is None or bv.dim() != 1 or not statically_known_true(bv.shape[0] == site.out_features):
            return "bias is not a 1-D [out_features] tensor"
    return None


def _val(n: object) -> torch.Tensor | None:
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("val", n.meta.get("example_value"))
    return v if isinstance(v, torch.Tensor) else None
