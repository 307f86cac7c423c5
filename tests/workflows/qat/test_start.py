"""QAT started from GPTQ's codes: `start_from_quantized` (float weights moved next to the codes), or
GPTQ's dequantized values themselves (``dequantize_base``); then prepare, train, convert.

Either start is exact: QAT's fake quantization (ratios 1) deploys GPTQ's own codes, so a QAT run
with no step deploys what GPTQ produced. With nested constants the second-level quantization of the
(already rounded) block constants moves them by up to ~5e-5 relative; the codes stay identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qbackend
from qbackend.formats import Scheme, quantize
from qbackend.formats.gptq import gptq_quantize
from qbackend.qat import QATConfig, dequantize_base, prepare, start_from_quantized
from qbackend.workflows.qat.start import nearest_in_cells


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


@pytest.mark.parametrize("values", [False, True], ids=["moved", "values"])
@pytest.mark.parametrize("nested", [False, True])
def test_qat_from_gptq_deploys_gptq_codes(cal, nested, values):
    opts = {"preset": "nf4", "min_params": 0, "nested": nested}
    gptq = _net()
    qbackend.quantize_(gptq, opts | {"method": "gptq", "calibration": cal})
    rtn = _net()
    qbackend.quantize_(rtn, opts)
    if values:
        student = copy.deepcopy(gptq)
        assert dequantize_base(student) == ["up", "down"]
        student.requires_grad_(True)
        assert prepare(student, opts | {"qat": QATConfig(learnable_scales=True)}) == ["up", "down"]
    else:
        student = _net()
        assert prepare(student, opts | {"qat": QATConfig(learnable_scales=True)}) == ["up", "down"]
        student.up.qat.weight_ratio.data.fill_(0.9)  # reset to 1: the start is round to nearest of the codes
        assert start_from_quantized(student, gptq) == ["up", "down"]
        assert bool((student.up.qat.weight_ratio == 1).all())
        for name in ("up", "down"):  # the float weights stay far closer to the original than GPTQ's values
            w0, w = getattr(_net(), name).weight, getattr(student, name).weight
            moved, deq = (w - w0).abs().mean(), (getattr(gptq, name).dequantized_weight() - w0).abs().mean()
            assert moved < 0.5 * deq
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


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 9),
    k=st.integers(1, 200),
    kind_nested=st.sampled_from([("nf4", True), ("nf4", False), ("fp4", False)]),
    seed=st.integers(0, 2**16),
)
def test_nearest_in_cells_rounds_to_the_given_codes(n, k, kind_nested, seed):
    """Any shape (blocks straddling rows, a short last block), GPTQ's codes and round to nearest's."""
    kind, nested = kind_nested
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(1, k, generator=g)
    x = torch.randn(3 * k + 4, k, generator=g) * torch.rand(k, generator=g) * 3
    scheme = Scheme(kind, blocksize=64, nested=nested)
    for qw in (gptq_quantize(w, x.t() @ x / x.shape[0], scheme).qweight, quantize(w, scheme)):
        wf = nearest_in_cells(w, qw.dequantize(torch.float32), scheme)
        again = quantize(wf, scheme)
        if kind == "nf4":  # fp4 has two codes for zero (+0, -0): compare its values (plain constants)
            assert torch.equal(again.codes, qw.codes)
        if not nested:  # nested: the constants are re-quantized (a small group can move them a map step)
            assert torch.equal(again.dequantize(torch.float32), qw.dequantize(torch.float32))
        assert (wf - w).abs().mean() <= (qw.dequantize(torch.float32) - w).abs().mean() + 1e-7


def test_nearest_in_cells_of_round_to_nearest_changes_little():
    """Weights already in their cells stay put (those within the margin of a cell edge move to it)."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    scheme = Scheme("nf4", blocksize=64, nested=False)
    wf = nearest_in_cells(w, quantize(w, scheme).dequantize(torch.float32), scheme)
    assert (wf == w).float().mean() > 0.75


def test_nearest_in_cells_and_start_from_quantized_reject_bad_input():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="only nf4/fp4 blocks"):
        nearest_in_cells(w, w, Scheme("int", blocksize=32))
    with pytest.raises(ValueError, match=r"weight \(4, 64\) and quantized \(2, 64\)"):
        nearest_in_cells(w, w[:2], Scheme("nf4", blocksize=64))
    with pytest.raises(ValueError, match="margin"):
        nearest_in_cells(w, w, Scheme("nf4", blocksize=64), margin=1.0)
    q = _net()
    qbackend.quantize_(q, {"preset": "nf4", "min_params": 0})
    other = _net()
    other.up = nn.Linear(64, 256)
    with pytest.raises(ValueError, match="up is"):
        start_from_quantized(other, q)
