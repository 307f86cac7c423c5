"""The "w8a8" preset in module form: swap linear modules for `W8A8Linear` computing what the backend compiles.

Used by ``qbackend.quantize_`` (and so by ``qbackend.save`` / ``qbackend.export_mlir``) when the
config has ``smoothquant`` set.

* Without smoothing (no calibration, or ``smooth=False``): every eligible linear module is quantized
  from its own weight, as the W8A8 lowering does for an unfolded weight; static per-tensor scales
  come from the calibration statistics (:func:`.scales.static_act_scale`).
* With SmoothQuant: the scales and where 1/s goes depend on the dataflow (which norm or linear
  produces a linear's input), which only a graph shows. So the model is traced once by Dynamo (the
  graph the backend receives) on the calibration's first batch (or ``example_inputs``), the
  backend's own W8A8 passes (:func:`.pipeline.run_w8a8`: same scale choice, same folds, same
  quantization) rewrite that graph, and the result is moved onto the modules:

  - each lowered layer becomes a `W8A8Linear` with the graph's codes, scales, activation scale and
    outlier threshold, plus the graph's explicit ``x * (1/s)`` constant where it has one;
  - each parameter the graph folded 1/s into (LayerNorm/RMSNorm weight and bias, LlamaRMSNorm's
    multiplied weight, a producing linear's bias, a float linear's ``W * s``) is set on its module to
    the folded value, so a checkpoint holds the folded float norm parameters.

  Where one module cannot hold a fold (its parameter is folded differently for two uses, or also read
  unfolded; a norm without an affine weight, which the graph gives one), that group's layers get the
  explicit multiply by the same 1/s instead: equal up to float rounding, and said in their
  ``smoothing``.

The codes and scales are the compiled model's, bit for bit, and outputs equal the backend's graph
run eagerly exactly; against the compiled model they differ by the float rounding of the ops
Inductor fuses (which can flip an int8 activation rounding: ~1e-3 at worst in the tests).

Side effect of the trace: Dynamo's cache for the model's ``forward`` is cleared (as
``torch._dynamo.export`` does), so a compiled model of the same class recompiles once on its next call.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...formats import quantize
from ...passes import find_linears, graph_params
from ...passes.modules import is_conv1d, linear_modules, set_param
from ...passes.params import get_attr
from ...passes.report import LayerReport, Report, float_row
from ...passes.select_layers import decide_layer
from ...passes.trace import TraceError, trace_once
from ...passes.weight_cache import effective_weight
from .fold import NODE_META, FoldReport, GroupFold
from .linear import W8A8Linear
from .lower import W8A8_SCHEME, mark_quantized
from .pipeline import run_w8a8
from .scales import static_act_scale

log = logging.getLogger("qbackend")

_EXPLICIT = "explicit smoothing multiply"  # NODE_META of the multiplies smoothquant_fold inserts


class W8A8ModuleError(ValueError):
    """The W8A8 module form cannot be built for this model; the message says why and what to do."""


def quantize_w8a8_(model: nn.Module, config: Any, example_inputs: Any = None) -> Report:
    """Swap ``model``'s eligible linear modules (in place) for `W8A8Linear`; returns the per-layer report.

    config: a ``QuantConfig`` with ``smoothquant`` set (preset "w8a8").
    example_inputs: one batch to trace the model on (a tensor, a tuple of arguments or a dict of
        keyword arguments); default: the calibration's first batch. Only SmoothQuant needs it.
    """
    sq, cal = config.smoothquant, config.calibration
    if sq is None:
        raise ValueError("quantize_w8a8_ needs a W8A8 config (preset='w8a8')")
    if not sq.smooth or cal is None:
        if sq.smooth:
            warnings.warn(
                "qbackend: W8A8 without a calibration: naive W8A8, no SmoothQuant scales (as the compiled model); "
                "pass calibration=qbackend.calibrate(model, batches) to smooth",
                stacklevel=3,
            )
        return _unsmoothed(model, config)
    example = example_inputs if example_inputs is not None else cal.example
    if example is None:
        raise W8A8ModuleError(
            "SmoothQuant W8A8 in module form (quantize_/save/export_mlir) traces the model once to find where the "
            "scales fold, but this calibration holds no example batch (saved by an older qbackend, or its batch "
            "was not tensors): pass example_inputs=<one batch> (save(..., example_inputs=...)), or re-run "
            "qbackend.calibrate"
        )
    return _smoothed(model, config, example)


# ---- without smoothing: from the modules alone ------------------------------------------------


def _unsmoothed(model: nn.Module, config: Any) -> Report:
    sq, cal = config.smoothquant, config.calibration
    report = Report(graphs=0)
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, parent, child, mod in list(linear_modules(model)):
        transposed = is_conv1d(mod)
        w = mod.weight
        n, k = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        row = float_row(name, f"{name}.weight", w, transposed=transposed, forms=("conv1d" if transposed else "linear",))
        report.layers.append(row)
        scheme, row.reason = decide_layer(name, w.numel(), config)
        if scheme is None:
            continue
        first = id(w) not in shared
        if first:  # tied weights: quantized once
            ew = effective_weight(w, transposed)
            qw = quantize(ew.contiguous() if transposed else ew, W8A8_SCHEME, name=name)
            shared[id(w)] = (qw.codes.reshape(-1), qw.scale.reshape(-1).float())
        codes, scale = shared[id(w)]
        act_scale = None
        if sq.activation == "tensor":
            stats = cal.get(name) if cal is not None else None
            if stats is None:
                log.info("qbackend: %s: no calibration statistics for a static activation scale; per-token instead",
                         name)  # fmt: skip
            else:
                act_scale = static_act_scale(stats.absmax, None, sq.outlier_threshold).to(w.device)
        layer = W8A8Linear(codes, scale, mod.bias, out_features=int(n), in_features=int(k), act_scale=act_scale,
                           threshold=sq.outlier_threshold, smoothing="not smoothed")  # fmt: skip
        setattr(parent, child, layer)
        _quantized_row(row, layer, counted=first)
    return report


def _quantized_row(row: LayerReport, layer: W8A8Linear, counted: bool = True) -> None:
    mark_quantized(row, layer.out_features, layer.in_features, layer.format, counted)
    row.reason = ""


# ---- with SmoothQuant: the backend's passes on a trace, moved onto the modules ------------------------


def _smoothed(model: nn.Module, config: Any, example: Any) -> Report:
    modules = {name: (parent, child) for name, parent, child, _ in linear_modules(model)}
    gm = _trace(model, example)
    # Linears that are no nn.Linear/Conv1D module (F.linear on a parameter, nn.MultiheadAttention)
    # cannot be swapped: the passes must not lower them (as float layers they may still absorb a
    # group's s, like any float linear: their W * s is then set on the parameter).
    foreign = sorted({s.layer_name for s in find_linears(gm)} - set(modules))
    if foreign:
        log.warning("qbackend: W8A8 module form: %s are not nn.Linear/Conv1D modules and stay float "
                    "(the compiled model quantizes them)", foreign)  # fmt: skip
        config = config.replace(exclude=(*config.exclude, *(re.compile(re.escape(n)) for n in foreign)))
    result = run_w8a8(gm, config)
    fold = result.fold if result.fold is not None else FoldReport()
    params, fallback = _folded_params(gm, fold)
    layers = _layers(gm, result, fold, fallback)
    stray = [name for name in layers if name not in modules]  # e.g. a weight shared with a non-module linear
    if stray:
        raise W8A8ModuleError(f"layer {stray[0]!r} is lowered but is no nn.Linear/Conv1D module of the model; "
                              "exclude it (exclude=[...]) to save or export this model")  # fmt: skip
    # Nothing of the model changed so far: every error above leaves it as it was.
    for fqn, value in params.items():
        set_param(model, fqn, value)
    for name, layer in layers.items():
        parent, child = modules[name]
        setattr(parent, child, layer)
    report = result.report
    report.graphs = 0
    for row in report.layers:
        if row.name in foreign:
            row.reason = "not an nn.Linear/Conv1D module: stays float in module form (the compiled model quantizes it)"
        elif row.name in layers:
            row.format = layers[row.name].format
    return report


def _trace(model: nn.Module, example: Any) -> fx.GraphModule:
    """The Dynamo graph the backend would receive for ``model(example)`` (:func:`qbackend.passes.trace.trace_once`)."""
    try:
        return trace_once(model, example)
    except TraceError as e:
        if "graphs, not one" in str(e):
            raise W8A8ModuleError(f"SmoothQuant W8A8 in module form: {e}") from e
        raise W8A8ModuleError(
            f"SmoothQuant W8A8 in module form traces the model once to find where the scales fold, and that "
            f"failed: {e}. The model must trace as one graph (no graph break) on the example "
            "batch (the calibration's first batch, or example_inputs=); or use smoothquant={'smooth': False}"
        ) from e


def _folded_params(gm: fx.GraphModule, fold: FoldReport) -> tuple[dict[str, torch.Tensor], dict[str, GroupFold]]:
    """``(parameter name -> folded value to set on the module, layer -> group smoothed by an explicit multiply
    instead of its exact fold)``."""
    params = graph_params(gm)
    live = set(gm.graph.nodes)
    found: dict[str, list[torch.Tensor]] = {}
    for (_reader, orig), new in fold.replaced.items():
        ref = params.get(orig)
        # explicit multiplies replace activations (not parameters); folded weights of lowered layers are
        # gone from the graph (quantized into codes)
        if ref is None or new not in live or new.op != "get_attr":
            continue
        found.setdefault(ref.fqn, []).append(get_attr(gm, new.target))
    read_unfolded = {ref.fqn for node, ref in params.items() if ref.fqn in found and node.users}
    conflicts = {f for f, vs in found.items() if f in read_unfolded or any(not torch.equal(v, vs[0]) for v in vs[1:])}
    fallback: dict[str, GroupFold] = {}
    for g in fold.groups:
        if not (g.exact and (g.adds_weight or conflicts & set(g.params))):
            continue
        if g.kind == "linear_rows":  # the producer's codes already hold 1/s: no multiply can stand in
            raise W8A8ModuleError(
                f"SmoothQuant folded the scales of {list(g.layers)} into the output rows of {g.target!r}, whose "
                f"parameters {sorted(conflicts & set(g.params))} are also used elsewhere: one module cannot hold "
                f"both; exclude {list(g.layers)} (exclude=[...]) to save or export this model"
            )
        fallback.update(dict.fromkeys(g.layers, g))
    kept = {p for g in fallback.values() for p in g.params}
    left = sorted(conflicts - kept)
    if left:
        raise W8A8ModuleError(
            f"SmoothQuant folded parameter {left[0]!r} differently for two of its uses (or also reads it "
            "unfolded): one module cannot hold both; exclude the linear layers reading it (exclude=[...])"
        )
    return {f: vs[0] for f, vs in found.items() if f not in kept}, fallback


def _layers(gm: fx.GraphModule, result: Any, fold: FoldReport, fallback: dict[str, GroupFold]) -> dict[str, W8A8Linear]:
    """One `W8A8Linear` per module whose linear the passes lowered, from the lowered node's arguments."""
    params = graph_params(gm)
    group_of = {layer: g for g in fold.groups for layer in g.layers}
    out: dict[str, W8A8Linear] = {}
    for low in result.w8a8:
        for site in low.plan.lowerable_sites:
            name, node = site.layer_name, site.node
            x, codes_n, scale_n, bias_n, act_n = node.args[:5]
            threshold = float(node.args[5]) if node.target == torch.ops.qbackend.w8a8_outlier_linear.default else None
            n, k = int(node.args[-2]), int(node.args[-1])
            codes, scale = get_attr(gm, codes_n.target), get_attr(gm, scale_n.target)
            if low.entry is not None:  # the backend's shared entry, re-quantized in place if the weight changes
                codes, scale = codes.clone(), scale.clone()
            smooth = None
            if isinstance(x, fx.Node) and x.meta.get(NODE_META) == _EXPLICIT:
                smooth = get_attr(gm, x.args[1].target)
            elif name in fallback:
                s = fallback[name].choice.s.detach().double().reshape(-1)
                smooth = (1.0 / s).to(device=codes.device, dtype=_dtype(x))
            layer = W8A8Linear(
                codes, scale, _bias(gm, params, bias_n, name), out_features=n, in_features=k,
                act_scale=None if act_n is None else get_attr(gm, act_n.target), threshold=threshold, smooth=smooth,
                smoothing=_describe(group_of.get(name), name in fallback),
            )  # fmt: skip
            prev = out.get(name)
            if prev is not None and (prev.codes is not layer.codes or (prev.smooth is None) != (smooth is None)):
                raise W8A8ModuleError(f"layer {name!r} is called at several places that the passes quantized "
                                      "differently; one module cannot hold both")  # fmt: skip
            out[name] = layer
    return out


def _bias(gm: fx.GraphModule, params: dict, node: Any, layer: str) -> torch.Tensor | None:
    if node is None:
        return None
    if node in params:
        return params[node].tensor
    if isinstance(node, fx.Node) and node.op == "get_attr":  # a bias 1/s was folded into (linear_rows)
        return get_attr(gm, node.target)
    raise W8A8ModuleError(f"layer {layer!r}: its bias is computed in the graph ({node}), not a parameter; "
                          "the module form cannot hold it: exclude the layer (exclude=[...])")  # fmt: skip


def _describe(g: GroupFold | None, fallback: bool) -> str:
    if g is None or g.kind == "skipped" or g.choice is None:
        return "not smoothed" + (f" ({g.reason})" if g is not None and g.reason else "")
    alpha = f"alpha={g.choice.alpha:g}{' (searched)' if g.choice.searched else ''}"
    if fallback:
        return f"explicit multiply (the {g.kind} fold into {g.target} cannot be held by the module), {alpha}"
    if g.exact:
        return f"folded into {g.target} ({g.kind}), {alpha}"
    return f"explicit multiply ({g.reason}), {alpha}"


def _dtype(x: Any) -> torch.dtype:
    v = x.meta.get("example_value", x.meta.get("val")) if isinstance(x, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else torch.float32
