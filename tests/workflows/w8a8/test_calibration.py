"""Calibration: what it records (through the backend's graph), its errors, save/load, and scales never NaN."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qbackend
from qbackend.smoothquant import CalibrationError, CalibrationResult, SmoothQuantConfig
from qbackend.workflows.w8a8.scales import choose_scale, smoothing_scale, static_act_scale


class Forms(nn.Module):
    """Linears in the forms the backend lowers, plus a branch no batch takes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 20)
        self.w = nn.Parameter(torch.randn(16, 20) / 4)  # F.linear
        self.kn = nn.Parameter(torch.randn(16, 8) / 4)  # x @ w, stored [in, out]
        self.bias = nn.Parameter(torch.zeros(8))
        self.unused = nn.Linear(8, 8)

    def forward(self, x, use_unused: bool = False):
        h = torch.relu(self.a(x))
        h = F.linear(h, self.w)
        y = torch.addmm(self.bias, h.reshape(-1, 16), self.kn).reshape(*h.shape[:-1], 8)  # GPT-2 Conv1D form
        if use_unused:
            y = self.unused(y)
        return y


def _batches(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3 + i, 12, generator=g) * (1 + 9 * (torch.arange(12) == 5)) for i in range(n)]


def test_records_running_absmax_of_every_linear_input_by_backend_layer_name():
    torch.manual_seed(0)
    model = Forms().eval()
    batches = _batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = qbackend.calibrate(model, batches, progress=False, sample_tokens=7)
    assert set(result.layers) == {"a", "w", "kn"}  # the names qbackend.passes.find_linears gives these layers
    assert result.never_reached == ("unused",)
    assert any("unused" in str(w.message) for w in caught)
    with torch.no_grad():
        xs = torch.cat([b.reshape(-1, 12) for b in batches])
        h = torch.relu(model.a(xs))
        h2 = F.linear(h, model.w)
    for name, x in (("a", xs), ("w", h), ("kn", h2)):
        st_ = result.get(name)
        torch.testing.assert_close(st_.absmax, x.abs().amax(0), rtol=1e-6, atol=0)  # batched matmul rounding
        assert st_.tokens == xs.shape[0]
        assert st_.samples.shape == (7, x.shape[1])  # bounded sample (O(sample_tokens x channels))
        # every sampled row is a real input row
        assert float(torch.cdist(st_.samples, x).amin(dim=1).max()) < 1e-4
    assert result.num_batches == 3 and result.sample_tokens == 7


def test_zero_batches_and_a_single_tensor_are_clear_errors():
    model = Forms().eval()
    with pytest.raises(CalibrationError, match="zero batches"):
        qbackend.calibrate(model, [], progress=False)
    with pytest.raises(CalibrationError, match="zero batches"):
        qbackend.calibrate(model, (b for b in []), progress=False)
    with pytest.raises(CalibrationError, match="single tensor"):
        qbackend.calibrate(model, torch.randn(2, 12), progress=False)
    with pytest.raises(CalibrationError, match="sample_tokens"):
        qbackend.calibrate(model, _batches(1), sample_tokens=-1, progress=False)


def test_wrong_shape_batch_names_the_batch_and_its_shapes():
    model = Forms().eval()
    batches = [torch.randn(2, 3, 12), torch.randn(2, 3, 13)]
    with pytest.raises(CalibrationError, match=r"batch 1 \(tensor\(2, 3, 13\)/float32\) failed in the model"):
        qbackend.calibrate(model, batches, progress=False)
    with pytest.raises(CalibrationError, match=r"batch 0 \(\{x: tensor"):
        qbackend.calibrate(model, [{"x": torch.randn(2, 7)}], progress=False)


def test_nan_activations_and_models_without_linears_are_errors():
    model = Forms().eval()
    bad = torch.randn(2, 3, 12)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(CalibrationError, match="NaN/Inf values in batch 1"):
        qbackend.calibrate(model, [torch.randn(2, 3, 12), bad], progress=False)
    with pytest.raises(CalibrationError, match="no linear layer"):
        qbackend.calibrate(nn.Sequential(nn.ReLU()).eval(), [torch.randn(2, 4)], progress=False)


@pytest.mark.filterwarnings("ignore:.*no batch reached")
def test_save_load_roundtrip_and_corrupt_files(tmp_path):
    result = qbackend.calibrate(Forms().eval(), _batches(2), progress=False)
    st_path, js_path = result.save(tmp_path / "cal")
    assert st_path.name == "cal.safetensors" and js_path.name == "cal.json"
    loaded = CalibrationResult.load(tmp_path / "cal.safetensors")
    assert loaded.fingerprint() == result.fingerprint()
    assert loaded.never_reached == result.never_reached and loaded.num_batches == 2
    for name, st_ in result.layers.items():
        assert torch.equal(loaded.get(name).absmax, st_.absmax)
        assert torch.equal(loaded.get(name).samples, st_.samples)
    with pytest.raises(CalibrationError, match="does not exist"):
        CalibrationResult.load(tmp_path / "missing")
    doc = json.loads(js_path.read_text())
    doc["version"] = 99
    js_path.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match="version"):
        CalibrationResult.load(tmp_path / "cal")
    js_path.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        CalibrationResult.load(tmp_path / "cal")


@settings(max_examples=60)
@given(
    k=st.integers(1, 40),
    alpha=st.floats(0.0, 1.0),
    zeros=st.floats(0.0, 1.0),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]),
    seed=st.integers(0, 1000),
)
def test_scales_are_never_nan_or_zero(k, alpha, zeros, scale, seed):
    g = torch.Generator().manual_seed(seed)
    act = torch.rand(k, generator=g) * scale
    w = torch.rand(k, generator=g)
    act[torch.rand(k, generator=g) < zeros] = 0.0  # dead channels
    w[torch.rand(k, generator=g) < zeros] = 0.0  # all-zero weight columns
    s = smoothing_scale(act, w, alpha)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert bool((s[(act == 0) | (w == 0)] == 1).all())
    a = static_act_scale(act, s, threshold=None)
    assert bool(torch.isfinite(a).all()) and float(a) > 0


def test_alpha_search_beats_or_matches_every_fixed_alpha_on_its_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    x[:, 3] *= 40  # an outlier channel
    w = torch.randn(24, 32, generator=g) / 6
    st_ = qbackend.smoothquant.LayerStats(x.abs().amax(0), 256, x)
    cfg = SmoothQuantConfig(search_alpha=True)
    best = choose_scale(st_, [w], cfg, 0.5)
    assert best.searched and set(best.errors) == {None, *cfg.alpha_grid}
    assert best.error == min(best.errors.values())
    fixed = choose_scale(st_, [w], SmoothQuantConfig(), 0.5)
    assert best.error <= fixed.error
    assert best.errors[None] > fixed.error  # smoothing helps with an outlier channel
    no_samples = qbackend.smoothquant.LayerStats(x.abs().amax(0), 256, None)
    assert choose_scale(no_samples, [w], cfg, 0.5).alpha == 0.5  # no samples: the fixed alpha, not a guess


def test_static_scale_with_outliers_does_not_clip_a_calibrated_outlier_channel_that_comes_back_below():
    # Channel 1 reached 10 during calibration (an outlier at threshold 6); at run time it peaks at 5.5,
    # so it is quantized with the static scale and must not clip.
    scale = static_act_scale(torch.tensor([1.0, 10.0]), None, threshold=6.0)
    assert float(scale) == pytest.approx(6.0 / 127)
    x = torch.tensor([[0.5, 5.5], [-1.0, -5.0]])
    w = torch.eye(2)
    y = qbackend.workflows.w8a8.scales.simulate_w8a8(x, w, act_scale=scale, threshold=6.0)
    assert torch.allclose(y, x, atol=float(scale) / 2 + 1e-6)
