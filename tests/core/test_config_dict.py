"""QuantConfig.to_dict / from_dict: the versioned record checkpoints store, rebuilt exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch

import qbackend
from qbackend import QATConfig, QuantConfig
from qbackend.core.config import PRESETS, ConfigError


def _json_round_trip(c: QuantConfig) -> QuantConfig:
    return QuantConfig.from_dict(json.loads(json.dumps(c.to_dict())))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_round_trips(preset):
    c = QuantConfig.preset(preset)
    assert c.to_dict()["version"] == 2
    assert _json_round_trip(c) == c


def test_every_field_round_trips():
    c = QuantConfig.from_options({
        "preset": "int4", "blocksize": 64, "symmetric": True, "nested": True,
        "include": ["encoder", re.compile(r"layer\.\d+\.dense", re.IGNORECASE)], "exclude": ("lm_head",),
        "min_params": 7, "on_weight_change": "error", "inductor": {"max_autotune": True, "epilogue_fusion": 1},
        "mode": "reduce-overhead", "qat": QATConfig(learnable_scales=True, activations="static"),
    })  # fmt: skip
    back = _json_round_trip(c)
    assert back == c
    assert back.include[1].flags == c.include[1].flags and back.include[1].pattern == r"layer\.\d+\.dense"
    assert back.qat == QATConfig(learnable_scales=True, activations="static")


def test_smoothquant_settings_round_trip():
    c = QuantConfig.from_options({"preset": "w8a8", "smoothquant": {
        "alpha": 0.7, "layer_alpha": [("fc2", 0.3)], "activation": "tensor", "outlier_threshold": 4.0,
        "alpha_grid": (0.25, 0.5)}})  # fmt: skip
    assert _json_round_trip(c) == c


def test_calibration_is_recorded_as_a_summary_and_not_needed_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()
    cal = qbackend.calibrate(model, [torch.randn(2, 8) for _ in range(2)], progress=False)
    c = QuantConfig.from_options({"preset": "w8a8", "calibration": cal})
    d = c.to_dict()
    assert d["calibration"] == {"fingerprint": cal.fingerprint(), "num_batches": 2, "layers": len(cal.layers)}
    back = QuantConfig.from_dict(json.loads(json.dumps(d)))
    assert back.calibration is None and back == c.replace(calibration=None)


def test_inductor_values_that_are_not_json_are_named_not_recorded():
    c = QuantConfig(inductor={"max_autotune": True, "post_grad_custom_pass": print})
    d = c.to_dict()
    assert d["inductor"] == {"max_autotune": True} and d["not_recorded"] == ["inductor.post_grad_custom_pass"]
    assert QuantConfig.from_dict(d).inductor == {"max_autotune": True}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=3), "QuantConfig dict version 3 is not supported"),
        (lambda d: d.pop("version"), "QuantConfig dict version None is not supported"),
        (lambda d: d.update(group_size=3), r"unknown QuantConfig dict key\(s\) \['group_size'\]"),
        (lambda d: d.update(format="int3"), "unknown format 'int3'"),
    ],
    ids=["newer", "no-version", "unknown-key", "bad-value"],
)
def test_from_dict_errors(edit, message):
    d = QuantConfig().to_dict()
    edit(d)
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_dict(d)


def test_a_missing_key_takes_its_default():
    d = QuantConfig.preset("int8").to_dict()
    del d["mode"]
    assert QuantConfig.from_dict(d) == QuantConfig.preset("int8")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("include", 5, r"QuantConfig dict 'include': expected a list, got int"),
        ("exclude", [{"flags": 0}], r"QuantConfig dict exclude\[0\]: expected a string or a \{'regex', 'flags'\} dict"),
        ("include", ["a", {"regex": "a", "flags": "x"}], r"QuantConfig dict include\[1\]: expected a string or"),
        ("include", [{"regex": "(", "flags": 0}], r"QuantConfig dict include\[0\]: bad regex"),
    ],
    ids=["not-a-list", "no-regex", "flags-not-int", "bad-regex"],
)
def test_malformed_patterns_name_their_field(field, value, message):
    d = QuantConfig().to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_dict(d)


def test_compute_is_recorded_and_version_1_reads_as_auto():
    c = QuantConfig.preset("nf4", compute="int8")
    assert c.to_dict()["compute"] == "int8"
    assert _json_round_trip(c).compute == "int8"
    old = {k: v for k, v in QuantConfig.preset("int8").to_dict().items() if k != "compute"}
    old["version"] = 1  # written before the compute option existed
    assert QuantConfig.from_dict(old) == QuantConfig.preset("int8")
    with pytest.raises(ConfigError, match="version 1 has no 'compute' key"):
        QuantConfig.from_dict({**old, "compute": "fp32"})
