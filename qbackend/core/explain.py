"""``qbackend.explain``: what the backend would do to a model, layer by layer, without Inductor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..passes.params import clone_graph_module
from ..passes.report import LayerReport, Report
from . import registry
from .backend import resolve_config, run_passes
from .config import ConfigError


def explain(
    model: Callable, *example_inputs: Any, example_kwargs: dict[str, Any] | None = None, **options: Any
) -> Report:
    """Trace ``model(*example_inputs, **example_kwargs)`` with Dynamo, run qbackend's passes, return the report.

    ``options`` are :class:`~qbackend.core.config.QuantConfig` fields (or ``preset=``), as in
    ``torch.compile(..., options=...)``, or ``config=`` a registered workflow's config object. The
    report measures each layer's relative weight error and gives the arithmetic each quantized layer
    runs in on this machine (``compute``: the option resolved per layer). ``print(report)`` shows a table;
    ``report.layers`` holds the records; ``report.sections`` what the workflow reports besides
    (``report.sections["smoothquant"]``: the SmoothQuant fold of each graph, ``.table()`` prints it).
    Layers already swapped by :func:`qbackend.quantize_` are listed as pre-quantized. Runs the model
    once (in float, eagerly) under ``no_grad``; the model itself is not changed.
    """
    if "config" in options:
        config = options.pop("config")
        if options:
            raise ConfigError(f"qbackend.explain: give either config= or options ({', '.join(options)}), not both")
        config = resolve_config(config)
    else:
        config = resolve_config(options or None)
    reports: list[Report] = []

    def collect(gm: torch.fx.GraphModule, inputs: list[Any]):
        # Rewrite a copy: Dynamo keeps what we return in its cache, which must not hold quantized tensors.
        copy = clone_graph_module(gm)
        reports.append(run_passes(copy, config, measure_error=True).report)
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
    if not isinstance(model, torch.nn.Module):
        return []
    return [row for wf in registry.workflows() if wf.explain is not None for row in wf.explain(model)]
