"""Bad options and unusual models get a short error naming the option, the type received and what is
accepted; never a tensor or a whole object in the message."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qbackend
from qbackend import QuantConfig
from qbackend.core.config import ConfigError
from qbackend.formats import FormatError


@pytest.fixture(scope="module")
def calibration():
    m = nn.Sequential(nn.Linear(16, 16)).eval()
    return qbackend.calibrate(m, [torch.randn(2, 16)], progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"blocksize": 0}, "blocksize must be an int >= 1 or None; got 0"),
        ({"blocksize": -64}, "blocksize must be an int >= 1 or None; got -64"),
        ({"blocksize": 64.0}, "blocksize must be an int >= 1 or None; got 64.0"),
        ({"min_params": True}, "min_params must be an int >= 0; got True"),
        ({"min_params": -1}, "min_params must be an int >= 0; got -1"),
        ({"include": None}, "include must be a list of module names or regexes (str or re.Pattern); got NoneType"),
        ({"exclude": 3}, "exclude must be a list of module names or regexes (str or re.Pattern); got int"),
        ({"nested": 1}, "nested must be True, False or None; got int"),
        ({"weight_check": "always"}, "weight_check must be one of sampled, full, version; got 'always'"),
        ({"on_weight_change": torch.zeros(100)}, "on_weight_change must be one of requantize, error; got a Tensor of"),
        ({"preset": torch.zeros(3)}, "unknown preset a Tensor of shape (3,); valid presets"),
        ({"format": "x" * 500}, "unknown format a str of length 500; valid"),
        ({"calibration": torch.randn(100)}, "'calibration' is used by the W8A8 preset"),
        ({"smoothquant": {"alpha": torch.randn(5)}}, "alpha must be a number in [0, 1]; got a Tensor of shape (5,)"),
    ],
    ids=lambda v: str(v)[:30] if not isinstance(v, dict) else next(iter(v)),
)
def test_bad_option_values(options, message):
    with pytest.raises(ConfigError) as info:
        QuantConfig.from_options(options)
    assert message in str(info.value)
    assert len(str(info.value)) < 200 and "tensor(" not in str(info.value)


def test_a_calibration_passed_as_smoothquant_settings_gets_a_short_error(calibration):
    with pytest.raises(ConfigError) as info:
        QuantConfig.from_options({"smoothquant": calibration})
    assert str(info.value) == "smoothquant options must be a dict or SmoothQuantConfig; got CalibrationResult"


def test_a_qat_option_of_the_wrong_type_names_the_type(calibration):
    with pytest.raises(ConfigError, match="qat must be None, a bool, a QATConfig or a dict; got CalibrationResult"):
        QuantConfig.from_options({"qat": calibration})


def test_an_include_matching_nothing_warns():
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match=r"include pattern\(s\) 'encoder' matched no linear layer .*like '0', '2'"):
        qbackend.quantize_(m, {"include": ["encoder", "2"], "min_params": 0})
    assert isinstance(m[2], qbackend.QuantizedLinear) and isinstance(m[0], nn.Linear)


def test_an_include_matching_something_does_not_warn():
    m = nn.Sequential(nn.Linear(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qbackend.quantize_(m, {"include": ["0"], "min_params": 0})


def _meta_model() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(16, 16))


META = "0: is on the meta device (shape only, no values); materialise the model's weights first"


def test_a_meta_device_model_is_refused_by_quantize_():
    with pytest.raises(FormatError, match=META.replace("(", r"\(").replace(")", r"\)")):
        qbackend.quantize_(_meta_model(), {"min_params": 0})


def test_a_meta_device_model_is_refused_by_save(tmp_path):
    with pytest.raises(FormatError, match="is on the meta device"):
        qbackend.save(_meta_model(), tmp_path / "m.safetensors", min_params=0)


def test_a_meta_device_model_is_refused_by_the_backend():
    torch._dynamo.reset()
    c = torch.compile(_meta_model(), backend="qbackend", options={"min_params": 0})
    with pytest.raises(Exception, match="is on the meta device") as info:
        c(torch.randn(2, 16, device="meta"))
    assert "item() cannot be called on meta tensors" not in str(info.value)
    torch._dynamo.reset()
