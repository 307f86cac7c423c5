"""The weight-only module form: swap linear modules for `QuantizedLinear`, releasing their float weights.

Compiling with ``backend="qbackend"`` quantizes at compile time but leaves the user's module (and
its float weights) untouched, because the module is the user's. To free the float weights for good:

>>> report = qbackend.quantize_(model, "nf4")      # in place; nn.Linear -> QuantizedLinear
>>> model = torch.compile(model, backend="qbackend")  # the quantized ops are already in the graph
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from ...formats import quantize
from ...kernels import KernelWeight, UnsupportedWeight, prepare_weight
from ...passes import find_linears, graph_params, select_layers
from ...passes.channel_fold import FoldReport
from ...passes.modules import is_conv1d, linear_modules, set_param
from ...passes.params import get_attr
from ...passes.report import LayerReport, Report, float_row
from ...passes.select_layers import decide_layer
from ...passes.trace import TraceError, trace_once
from .awq_fold import awq_fold, fold_of
from .linear import QuantizedLinear
from .method import calibrated_quantizer, layer_progress, method_section

log = logging.getLogger("qbackend")


def quantize_weight_only(model: nn.Module, config: Any, example_inputs: Any = None) -> Report:
    """Replace eligible linear modules of ``model`` (in place) by `QuantizedLinear`; returns the report.

    ``config``: a ``QuantConfig`` (its format, include/exclude, min_params, method, compute). Modules
    sharing one weight (tied) share one set of quantized tensors. With a ``method`` other than "rtn" the
    per-layer outcome is in ``report.sections[method]``. AWQ with ``fold`` (True) traces the model once
    with Dynamo on ``example_inputs`` (default: the calibration's first batch) and folds each group's s
    as the compiled model does (:func:`_awq_module_folds`): the folded norm parameters / producing
    linear rows are set on the modules (a checkpoint holds them); the fold report is in
    ``report.sections["awq_fold"]``. Where the model does not trace as one graph, or a folded
    parameter cannot be held by one module, every layer keeps its own s and multiply (logged).
    """
    report = Report(graphs=0)
    shared: dict[tuple[int, bool], tuple[KernelWeight, torch.Tensor | None]] = {}
    method = getattr(config, "method", None)
    refined = method is not None and method.refines  # a method of its own (HQQ: without data)
    runs = []
    modules = all_modules = list(linear_modules(model))
    fold, folded = None, {}
    if refined and method.name == "awq" and method.fold is True:
        fold, folded = _awq_module_folds(model, config, example_inputs, {m[0] for m in modules})
    if refined:
        modules = layer_progress(method.name, label=lambda m: m[0])(modules)
    for name, parent, child_name, mod in modules:
        transposed = is_conv1d(mod)
        w = mod.weight
        row = float_row(name, f"{name}.weight", w, transposed=transposed, forms=("conv1d" if transposed else "linear",))
        report.layers.append(row)
        scheme, row.reason = decide_layer(name, w.numel(), config)
        if scheme is None:
            continue
        key = (id(w), transposed)
        kw, input_scale = shared.get(key, (None, None))
        bias = folded.get(f"{name}.bias", mod.bias)
        if kw is None:
            src = folded.get(f"{name}.weight", w)  # output rows that absorbed the next group's 1/s
            weight = src.detach().t().contiguous() if transposed else src.detach()
            try:
                group = fold_of(fold, name) if fold is not None else None
                quantizer = calibrated_quantizer(name, scheme, config, group) if refined else None
                qw = quantize(weight, scheme, name=name) if quantizer is None else quantizer(weight)
                runs.append(quantizer)
                kw = prepare_weight(qw)
            except UnsupportedWeight as e:
                row.reason = f"unsupported: {e.reason}"
                continue
            input_scale = None if quantizer is None else quantizer.input_scale
            shared[key] = (kw, input_scale)
            row.bytes_after = (qw.storage_bits() + 7) // 8
            row.bits_per_param = qw.bits_per_param()
        else:
            row.bytes_after = 0  # shares the tensors counted on the first layer
            row.bits_per_param = 0.0
        new = QuantizedLinear(kw, bias, scheme, getattr(config, "compute", "auto"), input_scale)
        setattr(parent, child_name, new)
        row.quantized, row.format, row.compute = True, scheme.name, new.compute
    swapped = {name for name, _, _, _ in all_modules if isinstance(model.get_submodule(name), QuantizedLinear)}
    for fqn, value in folded.items():  # norms (and linears left float) holding 1/s
        if fqn.rpartition(".")[0] not in swapped:
            set_param(model, fqn, value)
    if refined:
        report.sections[method.name] = [method_section(method, runs)]
    if fold is not None:
        report.sections["awq_fold"] = [fold]
    return report


def _awq_module_folds(
    model: nn.Module, config: Any, example_inputs: Any, modules: set[str]
) -> tuple[FoldReport | None, dict[str, torch.Tensor]]:
    """``(fold report, parameter name -> folded value)`` of the compiled path's AWQ folds on a trace of
    ``model``, or ``(None, {})`` (every layer its own multiply) where the module form cannot hold them."""
    example = example_inputs if example_inputs is not None else config.calibration.example
    if example is None:
        log.warning("qbackend: AWQ module form: no example batch to trace (pass example_inputs=): no folds, "
                    "every layer multiplies its input by its own 1/s")  # fmt: skip
        return None, {}
    try:
        gm = trace_once(model, example)
    except TraceError as e:
        log.warning("qbackend: AWQ module form: the model does not trace as one graph (%s): no folds, every layer "
                    "multiplies its input by its own 1/s", e)  # fmt: skip
        return None, {}
    sites = find_linears(gm)
    foreign = sorted({s.layer_name for s in sites} - modules)
    if foreign:  # no module to swap: they stay float here, so must not be part of a group
        config = config.replace(exclude=(*config.exclude, *(re.compile(re.escape(n)) for n in foreign)))
    fold = awq_fold(gm, select_layers(sites, config), config)
    params = graph_params(gm)
    found: dict[str, list[torch.Tensor]] = {}
    for (_reader, orig), new in fold.replaced.items():
        ref = params.get(orig)
        if ref is not None and new.op == "get_attr":
            found.setdefault(ref.fqn, []).append(get_attr(gm, new.target))
    read_unfolded = {ref.fqn for node, ref in params.items() if ref.fqn in found and node.users}
    clash = sorted(f for f, vs in found.items() if f in read_unfolded or any(not torch.equal(v, vs[0]) for v in vs[1:]))
    if clash:
        log.warning("qbackend: AWQ module form: %s would be folded differently for two uses (or also read unfolded): "
                    "no folds, every layer multiplies its input by its own 1/s", clash[0])  # fmt: skip
        return None, {}
    return fold, {f: vs[0] for f, vs in found.items()}



def prequantized_rows(model: nn.Module) -> list[LayerReport]:
    """Report rows of the `QuantizedLinear` modules already in ``model`` (for ``qbackend.explain``)."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            nbytes = sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
            numel = m.in_features * m.out_features
            rows.append(LayerReport(
                name=name, param=f"{name}.weight", shape=(m.out_features, m.in_features), forms=("QuantizedLinear",),
                quantized=True, format=m.scheme.name, bits_per_param=8 * nbytes / numel, bytes_after=nbytes,
                compute=m.compute,
            ))  # fmt: skip
    return rows
