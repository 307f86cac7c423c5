"""The ``method`` option of weight-only presets (GPTQ) through torch.compile, quantize_, explain and save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qbackend
from qbackend import QuantConfig
from qbackend.core.config import ConfigError
from qbackend.formats.gptq import CalibrationDataError


class Net(nn.Module):
    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(128)
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)
        self.unused = nn.Linear(128, 128)  # only on the branch calibration never takes
        self.branch = branch

    def forward(self, x):
        h = self.down(torch.nn.functional.gelu(self.up(self.ln(x))))
        return self.unused(h) if self.branch else h


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def cal():
    g = torch.Generator().manual_seed(1)
    return qbackend.calibrate(_net(), [torch.randn(4, 64, 128, generator=g) for _ in range(4)], hessian=True,
                              progress=False)  # fmt: skip


def _opts(cal, preset="nf4", exclude=("unused",), **method):
    return {"preset": preset, "min_params": 0, "exclude": list(exclude), "method": {"name": "gptq", **method},
            "calibration": cal}  # fmt: skip


@pytest.mark.parametrize(("preset", "act_order"), [("nf4", False), ("int4", True), ("int8", False)])
def test_compiled_and_module_forms_agree_and_report_the_error_before_and_after(cal, preset, act_order):
    x = torch.randn(3, 7, 128)
    m = _net()
    torch._dynamo.reset()
    with torch.no_grad():
        y_compiled = torch.compile(m, backend="qbackend", options=_opts(cal, preset, act_order=act_order))(x)
    q = copy.deepcopy(m)
    report = qbackend.quantize_(q, _opts(cal, preset, act_order=act_order))
    with torch.no_grad():
        torch.testing.assert_close(q(x), y_compiled, rtol=1e-5, atol=1e-5)
    rows = {r.layer: r for r in report.sections["gptq"][0].rows}
    assert set(rows) == {"up", "down"}
    for r in rows.values():
        assert r.error <= r.rtn_error and r.seconds > 0 and r.tokens == 1024
    assert any(r.error < 0.95 * r.rtn_error for r in rows.values())


def test_explain_shows_the_per_layer_error_before_and_after(cal):
    torch._dynamo.reset()
    report = qbackend.explain(_net(), torch.randn(2, 5, 128), **_opts(cal))
    section = report.sections["gptq"][0]
    assert {r.layer for r in section.rows} >= {"up", "down"}
    assert "RTN err" in section.table() and "up" in section.table()


def test_saved_and_reloaded_gptq_model_gives_identical_outputs_without_rerunning(cal, tmp_path, monkeypatch):
    q = _net()
    qbackend.quantize_(q, _opts(cal, "int4", act_order=True))
    x = torch.randn(2, 9, 128)
    with torch.no_grad():
        before = q(x)
    qbackend.save(q, tmp_path / "m.safetensors")

    def no_rerun(*a, **k):
        raise AssertionError("GPTQ ran on load")

    monkeypatch.setattr("qbackend.workflows.weight_only.method.gptq_quantize", no_rerun)
    loaded = qbackend.load(tmp_path / "m.safetensors", model=Net().eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), before)


def test_a_layer_calibration_never_reached_is_an_error_naming_it_unless_rtn_fallback_is_asked(cal):
    m = _net()
    m.branch = True
    with pytest.raises(CalibrationDataError, match="unused.*no calibration batch reached it.*fallback"):
        qbackend.quantize_(copy.deepcopy(m), _opts(cal, exclude=()))
    report = qbackend.quantize_(m, _opts(cal, exclude=(), fallback="rtn"))
    row = {r.layer: r for r in report.sections["gptq"][0].rows}["unused"]
    assert row.method == "rtn" and row.note.startswith("fallback:")
    assert report.layer("unused").quantized


def test_missing_hessian_and_too_few_tokens_are_errors_naming_the_layer():
    m = _net()
    small = qbackend.calibrate(m, [torch.randn(1, 8, 128)], hessian=True, progress=False)
    with pytest.raises(CalibrationDataError, match="up: calibration saw only 8 tokens.*min_tokens=64"):
        qbackend.quantize_(copy.deepcopy(m), _opts(small))
    no_h = qbackend.calibrate(m, [torch.randn(1, 80, 128)], progress=False)
    with pytest.raises(CalibrationDataError, match=r"up: the calibration holds no X\^T X.*hessian=True"):
        qbackend.quantize_(copy.deepcopy(m), _opts(no_h))


def test_bad_method_options_are_config_errors(cal):
    with pytest.raises(ConfigError, match="needs calibration data"):
        QuantConfig.from_options({"preset": "nf4", "method": "gptq"})
    with pytest.raises(ConfigError, match="unknown method 'squeeze'; valid: rtn, gptq"):
        QuantConfig.from_options({"method": "squeeze"})
    with pytest.raises(ConfigError, match="unknown method option"):
        QuantConfig.from_options({"method": {"name": "gptq", "dampening": 0.1}, "calibration": cal})
    with pytest.raises(ConfigError, match="method and smoothquant cannot be combined"):
        QuantConfig.from_options({"preset": "w8a8", "method": "gptq", "calibration": cal})
    with pytest.raises(ConfigError, match="method 'rtn' uses no calibration"):
        QuantConfig.from_options({"method": "rtn", "calibration": cal})


def test_config_round_trips_through_its_dict_and_a_saved_calibration_path(cal, tmp_path):
    cal.save(tmp_path / "cal")
    config = QuantConfig.from_options(_opts(str(tmp_path / "cal"), act_order=True))
    assert config.calibration.fingerprint() == cal.fingerprint() and config.method.act_order
    d = config.to_dict()
    assert d["method"]["name"] == "gptq" and d["calibration"]["fingerprint"] == cal.fingerprint()
    assert QuantConfig.from_dict({**d, "method": {**d["method"], "name": "rtn"}}).method.name == "rtn"
