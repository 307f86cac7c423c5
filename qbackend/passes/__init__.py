"""FX graph passes, one module each; :mod:`qbackend.backend` composes them.

Pipeline on the Dynamo graph (before Inductor):

1. :func:`find_linears` (read-only): every linear site whose weight is a parameter, in any form.
2. :func:`select_layers` (read-only): group sites by weight (tied weights: one layer), decide
   quantize or stay float, with the reason.
3. (SmoothQuant folding, issue 5, slots in here: it rescales the planned weights and their producers.)
4. :func:`lower_linears`: quantize each selected weight once and rewrite its sites to the
   quantized op (QAT's fake-quant insertion, issue 6, replaces this step when training).
"""

from .find_linears import LinearSite, find_linears
from .lower_linears import BUFFER_PREFIX, LAYER_META, LoweringResult, lower_linears
from .params import ParamRef, graph_params
from .select_layers import LayerPlan, select_layers

__all__ = [
    "BUFFER_PREFIX",
    "LAYER_META",
    "LayerPlan",
    "LinearSite",
    "LoweringResult",
    "ParamRef",
    "find_linears",
    "graph_params",
    "lower_linears",
    "select_layers",
]
