"""The QAT compile path: find -> select -> QAT insertion (:mod:`.insert`) -> weight-only lowering of the rest.

Runs for configs with ``qat`` set and for graphs of prepared models (layers with QAT state) compiled
with plain options.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ...passes import find_linears, graph_params, select_layers
from ...passes.lowering import LoweringResult
from ..weight_only.lower import lower_linears
from .insert import insert_qat
from .state import state_of


def run_qat(gm: fx.GraphModule, config: Any, measure_error: bool = False) -> LoweringResult:
    """Rewrite ``gm`` in place: QAT layers get fake quantization (grad enabled) or their deployment; the
    other selected layers are lowered as weight-only (in the config's ``compute``; fp32 while training)."""
    plans = select_layers(find_linears(gm), config)
    qat, plans = insert_qat(gm, plans, config)
    compute = "fp32" if torch.is_grad_enabled() else getattr(config, "compute", "auto")
    result = lower_linears(gm, plans, measure_error=measure_error, compute=compute)
    result.report.layers[:0] = qat.report.layers
    result.lowered[:0] = qat.lowered
    result.nodes += qat.nodes
    return result


def has_qat_state(gm: fx.GraphModule) -> bool:
    """Whether a parameter of ``gm`` carries QAT state (``qbackend.qat.prepare`` was called on its model)."""
    return any(state_of(ref.tensor) is not None for ref in graph_params(gm).values())
