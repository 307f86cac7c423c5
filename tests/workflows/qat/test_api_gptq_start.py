"""QAT started from GPTQ's weights: quantize_ with method="gptq", dequantize_base, prepare, train, convert.

The starting point is exact: QAT's fake quantization (ratios 1) of GPTQ's dequantized NF4 weight
deploys GPTQ's own codes (its constants are each block's absmax, which the weight keeps), so a QAT
run with no step deploys what GPTQ produced. With nested constants the second-level quantization of
the (already rounded) block constants moves them by up to ~5e-5 relative; the codes stay identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qbackend
from qbackend.qat import QATConfig, dequantize_base, prepare


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def cal():
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(128, generator=g) * 4  # uneven input channels: GPTQ differs from round to nearest
    batches = [torch.randn(4, 64, 128, generator=g) * scale for _ in range(4)]
    return qbackend.calibrate(_net(), batches, hessian=True, progress=False)


def _buffers(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in layer.named_buffers()}


@pytest.mark.parametrize("nested", [False, True])
def test_qat_from_gptq_weights_deploys_gptq_codes(cal, nested):
    opts = {"preset": "nf4", "min_params": 0, "nested": nested}
    gptq = _net()
    qbackend.quantize_(gptq, opts | {"method": "gptq", "calibration": cal})
    rtn = _net()
    qbackend.quantize_(rtn, opts)
    student = copy.deepcopy(gptq)
    assert dequantize_base(student) == ["up", "down"]
    student.requires_grad_(True)
    assert prepare(student, opts | {"qat": QATConfig(learnable_scales=True)}) == ["up", "down"]
    deployed = qbackend.convert(copy.deepcopy(student))
    for name in ("up", "down"):
        g, d, r = (_buffers(getattr(m, name)) for m in (gptq, deployed, rtn))
        assert torch.equal(g["codes"], d["codes"]), f"{name}: QAT's start lost GPTQ's codes"
        assert not torch.equal(g["codes"], r["codes"])  # GPTQ's codes are not round to nearest's
        wg, wd = getattr(gptq, name).dequantized_weight(), getattr(deployed, name).dequantized_weight()
        if nested:
            torch.testing.assert_close(wd, wg, rtol=1e-4, atol=1e-6)  # the nested constants moved, not the codes
        else:
            assert torch.equal(wd, wg)
