"""`qbackend.qat.calibrate_clipping`: activation-aware initial clipping ratios for QAT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qbackend.qat import QATConfig, calibrate_clipping, fake_quantize_weight, prepare
from qbackend.workflows.qat.clipping import DEFAULT_GRID
from qbackend.workflows.qat.units import to_units


def _model(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 40))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            # heavy-tailed weights: a few large values per block make absmax scaling wasteful
            lin.weight.copy_(torch.distributions.StudentT(2.0).sample(lin.weight.shape) * 0.02)
    x = torch.randn(64, 96, generator=g) * torch.linspace(0.1, 3.0, 96)  # uneven channel energies
    return model, x


def _weighted_error(w, state, ratio, moment):
    fq = fake_quantize_weight(w, state.scheme, ratio, state.config.min_ratio).float()
    return to_units((fq - w.float()) ** 2 * moment[None, :], state.scheme).sum(dim=1)


@pytest.mark.parametrize("preset", ["nf4", "int4"])
def test_ratios_come_from_the_grid_and_lower_the_weighted_error(preset):
    model, x = _model()
    prepare(model, {"preset": preset, "min_params": 0, "qat": QATConfig(learnable_scales=True)})
    inputs = {0: x, 2: torch.relu(model[0](x)).detach()}
    assert calibrate_clipping(model, lambda: model(x)) == 2
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    improved = 0.0
    for i, inp in inputs.items():
        lin = model[i]
        state = lin.qat
        ratio = state.weight_ratio.detach()
        assert set(ratio.unique().tolist()) <= set(torch.tensor(DEFAULT_GRID).tolist())
        moment = (inp * inp).sum(0)
        err = _weighted_error(lin.weight.detach(), state, ratio, moment)
        err_absmax = _weighted_error(lin.weight.detach(), state, torch.ones_like(ratio), moment)
        if preset == "int4":  # independent units: never worse, unit by unit
            assert bool((err <= err_absmax * (1 + 1e-6)).all())
        # NF4's nested constants couple the blocks (second-level scale, offset): the total still improves
        assert float(err.sum()) < float(err_absmax.sum())
        improved += float(err_absmax.sum() - err.sum()) / float(err_absmax.sum())
    assert improved > 0.05  # heavy tails: clipping pays off clearly


def test_layers_run_never_reaches_keep_their_ratios_and_no_reach_is_an_error():
    model, x = _model()
    prepare(model, {"preset": "nf4", "min_params": 0, "qat": QATConfig(learnable_scales=True)})
    assert calibrate_clipping(model, lambda: model[0](x)) == 1
    assert bool((model[2].qat.weight_ratio == 1).all())
    with pytest.raises(ValueError, match="reached none of the 2 prepared layers"):
        calibrate_clipping(model, lambda: None)


def test_without_learnable_ratios_nothing_is_calibrated_and_bad_grids_are_rejected():
    model, x = _model()
    prepare(model, {"preset": "nf4", "min_params": 0, "qat": QATConfig(activations="static")})
    assert calibrate_clipping(model, lambda: model(x)) == 0
    with pytest.raises(ValueError, match=r"grid must be a non-empty sequence of ratios in \(0, 1\]"):
        calibrate_clipping(model, lambda: model(x), grid=(1.0, 1.5))
