"""``qbackend.explain``: what the backend would do to a model, layer by layer, without Inductor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .backend import run_passes
from .config import QuantConfig
from .passes.params import clone_graph_module
from .report import LayerReport, Report


def explain(
    model: Callable, *example_inputs: Any, example_kwargs: dict[str, Any] | None = None, **options: Any
) -> Report:
    """Trace ``model(*example_inputs, **example_kwargs)`` with Dynamo, run qbackend's passes, return the report.

    ``options`` are :class:`~qbackend.config.QuantConfig` fields (or ``preset=``), as in
    ``torch.compile(..., options=...)``. The report measures each layer's relative weight error.
    ``print(report)`` shows a table; ``report.layers`` holds the records. Layers already swapped by
    :func:`qbackend.quantize_` are listed as pre-quantized. Runs the model once (in float, eagerly)
    under ``no_grad``; the model itself is not changed.
    """
    config = QuantConfig.from_options(options or None)
    reports: list[Report] = []

    def collect(gm: torch.fx.GraphModule, inputs: list[Any]):
        # Rewrite a copy: Dynamo keeps what we return in its cache, which must not hold quantized tensors.
        reports.append(run_passes(clone_graph_module(gm), config, measure_error=True).report)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=collect)(*example_inputs, **(example_kwargs or {}))
    if not reports:
        raise RuntimeError(
            "qbackend.explain: Dynamo compiled no graph for this model (cached or recompile limit reached?); "
            "call torch._dynamo.reset() and retry"
        )
    report = reports[0].merge(reports[1:])
    report.layers.extend(_prequantized(model))
    return report


def _prequantized(model: Callable) -> list[LayerReport]:
    from .quantize_module import QuantizedLinear

    if not isinstance(model, torch.nn.Module):
        return []
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            nbytes = sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
            numel = m.in_features * m.out_features
            rows.append(LayerReport(
                name=name, param=f"{name}.weight", shape=(m.out_features, m.in_features), forms=("QuantizedLinear",),
                quantized=True, format=m.scheme.name, bits_per_param=8 * nbytes / numel, bytes_after=nbytes,
            ))  # fmt: skip
    return rows
