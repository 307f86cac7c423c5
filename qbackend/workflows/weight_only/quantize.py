"""The weight-only module form: swap linear modules for `QuantizedLinear`, releasing their float weights.

Compiling with ``backend="qbackend"`` quantizes at compile time but leaves the user's module (and
its float weights) untouched, because the module is the user's. To free the float weights for good:

>>> report = qbackend.quantize_(model, "nf4")      # in place; nn.Linear -> QuantizedLinear
>>> model = torch.compile(model, backend="qbackend")  # the quantized ops are already in the graph
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...formats import quantize
from ...kernels import KernelWeight, UnsupportedWeight, prepare_weight
from ...passes.modules import is_conv1d, linear_modules
from ...passes.report import LayerReport, Report, float_row
from ...passes.select_layers import decide_layer
from .linear import QuantizedLinear
from .method import calibrated_quantizer, layer_progress, method_section


def quantize_weight_only(model: nn.Module, config: Any, example_inputs: Any = None) -> Report:
    """Replace eligible linear modules of ``model`` (in place) by `QuantizedLinear`; returns the report.

    ``config``: a ``QuantConfig`` (its format, include/exclude, min_params, method, compute). ``example_inputs``
    is not used. Modules sharing one weight (tied) share one set of quantized tensors. With a
    calibrated ``method`` the per-layer outcome is in ``report.sections[method]``.
    """
    report = Report(graphs=0)
    shared: dict[tuple[int, bool], tuple[KernelWeight, torch.Tensor | None]] = {}
    method = getattr(config, "method", None)
    calibrated = method is not None and method.calibrated
    runs = []
    modules = list(linear_modules(model))
    if calibrated:
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
        if kw is None:
            weight = w.detach().t().contiguous() if transposed else w.detach()
            try:
                quantizer = calibrated_quantizer(name, scheme, config) if calibrated else None
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
        new = QuantizedLinear(kw, mod.bias, scheme, getattr(config, "compute", "auto"), input_scale)
        setattr(parent, child_name, new)
        row.quantized, row.format, row.compute = True, scheme.name, new.compute
    if calibrated:
        report.sections[method.name] = [method_section(method, runs)]
    return report



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
