"""Decide, per linear layer, whether it is quantized and why not.

Sites sharing one weight (tied weights, a layer called twice) form one `LayerPlan`, so the weight is
quantized once. Reasons a layer stays float: the user's include/exclude, ``min_params``, a format
the kernels do not support, or a site that cannot be lowered (``LinearSite.skip_reason``).

Invariant: read-only (no graph change); every site found belongs to exactly one plan, and every plan
either has a scheme (to quantize) or a non-empty reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..formats import Scheme
from ..kernels import supported
from .find_linears import LinearSite
from .params import ParamRef


class SelectionPolicy(Protocol):
    """What selection reads of a config (``QuantConfig`` has it): include/exclude, size floor, format."""

    min_params: int

    @property
    def scheme(self) -> Scheme: ...

    def selects(self, layer: str) -> tuple[bool, str]: ...


@dataclass
class LayerPlan:
    """One weight and the sites that use it.

    scheme: the format to quantize to, or None to stay float (``reason`` says why). Sites with a
    ``skip_reason`` stay float even when the layer is quantized (their reason is in ``reason``).
    transposed: the parameter is stored ``[in, out]`` (the weight is its transpose).
    """

    name: str
    param: ParamRef
    transposed: bool
    sites: list[LinearSite]
    scheme: Scheme | None
    reason: str = ""

    @property
    def lowerable_sites(self) -> list[LinearSite]:
        return [s for s in self.sites if s.skip_reason is None] if self.scheme is not None else []


def select_layers(sites: list[LinearSite], config: SelectionPolicy) -> list[LayerPlan]:
    """Group ``sites`` by weight and apply ``config``'s policy to each group."""
    groups: dict[tuple[int, bool], list[LinearSite]] = {}
    for s in sites:
        groups.setdefault((id(s.param.tensor), s.transposed), []).append(s)
    plans = []
    for group in groups.values():
        first = group[0]
        plan = LayerPlan(first.layer_name, first.param, first.transposed, group, None)
        plan.scheme, plan.reason = _decide(plan, config)
        plans.append(plan)
    return plans


def decide_layer(name: str, numel: int, config: SelectionPolicy) -> tuple[Scheme | None, str]:
    """The policy for one layer by name and size: ``(scheme, "")`` or ``(None, reason)``."""
    ok, why = config.selects(name)
    if not ok:
        return None, why
    if numel < config.min_params:
        return None, f"too small: {numel} params < min_params={config.min_params}"
    scheme = config.scheme
    ok, why = supported(scheme)
    if not ok:
        return None, f"unsupported: {why}"
    return scheme, ""


def _decide(plan: LayerPlan, config: SelectionPolicy) -> tuple[Scheme | None, str]:
    scheme, why = decide_layer(plan.name, plan.param.tensor.numel(), config)
    if scheme is None:
        return None, why
    skipped = [s for s in plan.sites if s.skip_reason is not None]
    if len(skipped) == len(plan.sites):
        return None, f"not lowerable: {skipped[0].skip_reason}"
    if skipped:
        return scheme, f"{len(skipped)} of {len(plan.sites)} uses stay float: {skipped[0].skip_reason}"
    return scheme, ""
