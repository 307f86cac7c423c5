"""`qbackend.calibrate`'s statistics for calibrated weight-only methods: mean |x| and streamed X^T X."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qbackend
from qbackend.passes.calibration_result import CalibrationError, CalibrationResult


class Attn(nn.Module):
    """q/k/v read one input (one shared X^T X), out reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, x):
        h = self.ln(x)
        return self.out(torch.relu(self.q(h) + self.k(h) * self.v(h)))


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5 + i, 32, generator=g) for i in range(n)]


def test_hessian_is_the_mean_x_t_x_of_every_token_and_shared_by_layers_reading_one_input():
    torch.manual_seed(0)
    m = Attn().eval()
    batches = _batches()
    cal = qbackend.calibrate(m, batches, hessian=True, progress=False)
    with torch.no_grad():
        xs = torch.cat([m.ln(b).reshape(-1, 32) for b in batches])
        hs = torch.cat([torch.relu(m.q(m.ln(b)) + m.k(m.ln(b)) * m.v(m.ln(b))).reshape(-1, 32) for b in batches])
    torch.testing.assert_close(cal.layers["q"].hessian, xs.t() @ xs / xs.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cal.layers["out"].hessian, hs.t() @ hs / hs.shape[0], rtol=1e-5, atol=1e-6)
    assert cal.layers["q"].hessian is cal.layers["k"].hessian is cal.layers["v"].hessian
    torch.testing.assert_close(cal.layers["q"].absmean, xs.abs().mean(0), rtol=1e-5, atol=1e-6)
    assert cal.layers["q"].tokens == xs.shape[0]


def test_without_hessian_only_channel_statistics_are_kept():
    cal = qbackend.calibrate(Attn().eval(), _batches(), progress=False)
    assert all(s.hessian is None and s.absmean is not None for s in cal.layers.values())


def test_saved_and_reloaded_with_shared_matrices_stored_once(tmp_path):
    cal = qbackend.calibrate(Attn().eval(), _batches(), hessian=True, progress=False)
    st_path, _ = cal.save(tmp_path / "cal")
    from safetensors.torch import load_file

    assert sum(key.endswith("::hessian") for key in load_file(str(st_path))) == 2  # q/k/v once, out once
    again = CalibrationResult.load(tmp_path / "cal")
    assert again.fingerprint() == cal.fingerprint()
    assert again.layers["q"].hessian is again.layers["v"].hessian
    for name, stats in cal.layers.items():
        assert torch.equal(again.layers[name].hessian, stats.hessian)
        assert torch.equal(again.layers[name].absmean, stats.absmean)


def test_too_big_hessians_are_refused_with_the_estimated_size():
    msg = r"X\^T X of layer .* needs .* MiB.*about .* MiB in all.*max_hessian_bytes"
    with pytest.raises(CalibrationError, match=msg):
        qbackend.calibrate(Attn().eval(), _batches(), hessian=True, max_hessian_bytes=5000, progress=False)


def test_hessian_layers_limits_what_is_recorded():
    cal = qbackend.calibrate(Attn().eval(), _batches(), hessian=True, hessian_layers=["out"], progress=False)
    assert cal.layers["out"].hessian is not None and cal.layers["q"].hessian is None
