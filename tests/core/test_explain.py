"""qbackend.explain: the public way to read what a workflow reports besides its layers (the SmoothQuant fold)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qbackend
from qbackend.core.config import ConfigError, QuantConfig
from qbackend.workflows.w8a8 import FoldReport


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q, self.k = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.q(h) + self.k(h)


def test_explain_gives_the_smoothquant_fold_report():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Block().eval()
    batches = [torch.randn(2, 5, 32) for _ in range(3)]
    cal = qbackend.calibrate(model, batches, progress=False)
    report = qbackend.explain(model, batches[0], preset="w8a8", calibration=cal, min_params=0)
    (fold,) = report.sections["smoothquant"]
    assert isinstance(fold, FoldReport)
    (group,) = fold.groups
    assert group.kind == "layer_norm" and set(group.layers) == {"q", "k"} and "norm" in fold.table()
    assert len(report.quantized) == 2
    plain = qbackend.explain(model, batches[0], preset="int8", min_params=0)
    assert plain.sections == {}


def test_config_and_options_together_is_an_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ConfigError, match=r"give either config= or options \(exclude\), not both"):
        qbackend.explain(model, torch.randn(1, 8), config=QuantConfig(), exclude=["0"])
