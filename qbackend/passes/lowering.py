"""What every lowering pass returns, and the names it leaves in the graph (shared by all workflows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .params import ParamRef
from .report import Report

#: prefix of every attribute a qbackend pass registers on a GraphModule (quantized tensors, folded constants)
BUFFER_PREFIX = "_qbackend_"
#: node meta key on each inserted op: the (param name, transposed) of the layer it computes
LAYER_META = "qbackend_layer"


class WeightEntry(Protocol):
    """A quantized weight the backend's per-call guard can check and refresh (``weight_cache.QuantEntry``)."""

    name: str

    def is_stale(self, param: torch.Tensor, check: str = "sampled") -> bool: ...

    def refresh(self, param: torch.Tensor, check: str | None = None) -> None: ...


@dataclass
class Lowered:
    """A quantized layer of a rewritten graph: its shared entry and where its parameter comes from."""

    entry: WeightEntry
    param: ParamRef


@dataclass
class LoweringResult:
    """A workflow's compile path result: the per-layer report, the guarded weights, the ops inserted."""

    report: Report
    lowered: list[Lowered] = field(default_factory=list)
    nodes: int = 0  # quantized op nodes inserted
