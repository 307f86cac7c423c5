"""The weight-only compile path on a Dynamo graph: find -> select -> lower."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ...passes import find_linears, select_layers
from ...passes.lowering import LoweringResult
from .lower import lower_linears


def run_weight_only(gm: fx.GraphModule, config: Any, measure_error: bool = False) -> LoweringResult:
    """Rewrite ``gm`` in place for ``config`` (a ``QuantConfig``: format, include/exclude, min_params, compute)."""
    plans = select_layers(find_linears(gm), config)
    return lower_linears(gm, plans, measure_error=measure_error, compute=getattr(config, "compute", "auto"))
