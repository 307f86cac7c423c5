"""Generic FX/module utilities every workflow builds on (no workflow-specific code).

On the Dynamo graph (before Inductor):

1. :func:`find_linears` (read-only): every linear site whose weight is a parameter, in any form.
2. :func:`select_layers` (read-only): group sites by weight (tied weights: one layer), decide
   quantize or stay float, with the reason.
3. A workflow's own passes rewrite the selected layers, with :mod:`.graph` (attributes, site
   rewrites), :mod:`.weight_cache` (quantized weights shared across compiles) and :mod:`.report`;
   they return a :class:`LoweringResult`.

Also: :mod:`.modules` (linear-module discovery for the module forms), :mod:`.params` (graph parameters).
"""

from .find_linears import LinearSite, find_linears
from .lowering import BUFFER_PREFIX, LAYER_META, Lowered, LoweringResult
from .params import ParamRef, graph_params
from .select_layers import LayerPlan, select_layers

__all__ = [
    "BUFFER_PREFIX",
    "LAYER_META",
    "LayerPlan",
    "LinearSite",
    "Lowered",
    "LoweringResult",
    "ParamRef",
    "find_linears",
    "graph_params",
    "select_layers",
]
