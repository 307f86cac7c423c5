"""How the W8A8 pipeline picks each smoothing group's s: from the calibration statistics, cached.

The pipeline hands :func:`scale_rule`'s function to :func:`.fold.smoothquant_fold` as its ``scale_fn``;
the fold calls it for each group. This module does not depend on the fold (a group is anything
with the `SmoothGroupView` fields), so the call goes down the module graph, never back up.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.fx as fx

from ...passes.calibration_result import CalibrationResult
from .config import SmoothQuantConfig
from .scales import ScaleChoice, choose_scale


class SmoothGroupView(Protocol):
    """What the rule reads of a smoothing group (``fold.SmoothGroup``)."""

    sites: Sequence[Any]  # LinearSite
    weights: list[torch.Tensor]

    @property
    def names(self) -> tuple[str, ...]: ...

    @property
    def in_features(self) -> int: ...


#: (calibration, config, layers, weights) -> choice: recompiles (new shapes, grad mode, graph breaks)
#: reuse a search instead of repeating it. Bounded; weights are identified by content statistics.
_CHOICES: OrderedDict[tuple, ScaleChoice | str] = OrderedDict()
_CHOICES_MAX = 4096


def scale_rule(
    sq: SmoothQuantConfig, cal: CalibrationResult, lowered: set[fx.Node]
) -> Callable[[SmoothGroupView], ScaleChoice | str]:
    """The s of each group (or why it stays unsmoothed): groups with no quantized layer, or without
    statistics, stay unsmoothed."""

    def scale(group: SmoothGroupView) -> ScaleChoice | str:
        if not any(s.node in lowered for s in group.sites):
            return "not quantized (stays float)"
        stats = next((st for n in group.names if (st := cal.get(n)) is not None), None)
        if stats is None:
            return "no calibration statistics (layer not reached during calibration)"
        if stats.in_features != group.in_features:
            return (f"calibration statistics have {stats.in_features} channels, the layer {group.in_features} "
                    "(calibrated on another model?)")  # fmt: skip
        key = (cal.fingerprint(), sq.fingerprint(), group.names, tuple(_content_key(w) for w in group.weights))
        if key not in _CHOICES:
            choice = choose_scale(stats, group.weights, sq, sq.alpha_for(group.names[0]))
            if choice.s is None:
                choice = f"alpha search: no smoothing gives the smallest error ({choice.error:.3g})"
            _CHOICES[key] = choice
            while len(_CHOICES) > _CHOICES_MAX:
                _CHOICES.popitem(last=False)
        return _CHOICES[key]

    return scale


def _content_key(w: torch.Tensor) -> tuple:
    w64 = w.detach().double()
    return (tuple(w.shape), str(w.dtype), float(w64.sum()), float(w64.pow(2).sum()), float(w64[..., ::7].abs().sum()))


