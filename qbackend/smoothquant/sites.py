"""The backend's linear sites, with the few facts SmoothQuant needs about them (read-only).

Calibration, folding and W8A8 lowering all use :func:`qbackend.passes.find_linears` on the Dynamo
graph, so the layers calibrated are exactly the layers the backend smooths and lowers, under the
same names (``LinearSite.layer_name``: the weight's module path without ``.weight``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..passes import LinearSite, find_linears

__all__ = ["LinearSite", "find_linears", "in_dim", "out_dim", "readers", "weight_nk"]


def readers(site: LinearSite, node: fx.Node) -> list[fx.Node]:
    """The nodes of ``site`` (its call, a fused matmul under a bias add, the weight's transpose) that
    read ``node`` directly."""
    return [n for n in (site.node, *site.consumed) if node in n.all_input_nodes]


def weight_nk(site: LinearSite, stored: torch.Tensor | None = None) -> torch.Tensor:
    """The [N, K] weight of ``site`` (or ``stored``, a tensor in the parameter's layout); a view."""
    w = site.param.tensor if stored is None else stored
    return w.t() if site.transposed else w


def in_dim(site: LinearSite) -> int:
    """Dimension of the stored parameter that runs over input channels (K)."""
    return 0 if site.transposed else 1


def out_dim(site: LinearSite) -> int:
    """Dimension of the stored parameter that runs over output channels (N)."""
    return 1 if site.transposed else 0
