"""``method: "hqq"`` (no data) through torch.compile, quantize_, explain and save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qbackend
from qbackend import QuantConfig
from qbackend.core.config import ConfigError
from qbackend.formats import FormatError, Scheme, quantize

SCHEMES = {"nf4": Scheme("nf4", blocksize=64, nested=True), "int4": Scheme("int", 4, symmetric=False, blocksize=128)}


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


def _opts(preset="nf4", **method):
    return {"preset": preset, "min_params": 0, "method": {"name": "hqq", "iters": 10, **method}}


@pytest.mark.parametrize("preset", ["nf4", "int4"])
def test_compiled_and_module_forms_agree_and_report_the_weight_error_before_and_after(preset):
    x = torch.randn(3, 7, 128)
    m = _net()
    torch._dynamo.reset()
    with torch.no_grad():
        y_compiled = torch.compile(m, backend="qbackend", options=_opts(preset))(x)
    q = copy.deepcopy(m)
    report = qbackend.quantize_(q, _opts(preset))
    with torch.no_grad():
        torch.testing.assert_close(q(x), y_compiled, rtol=1e-5, atol=1e-5)
    rows = {r.layer: r for r in report.sections["hqq"][0].rows}
    assert set(rows) == {"up", "down"}
    for name, r in rows.items():
        assert r.method == "hqq" and r.tokens == 0 and r.seconds > 0 and "units refined" in r.note
        w = getattr(m, name).weight.detach()
        rtn = quantize(w, SCHEMES[preset]).dequantize(torch.float32)
        assert r.rtn_error == pytest.approx(float((w - rtn).norm() / w.norm()), rel=1e-5)
        assert 0 < r.error < 1.5 * r.rtn_error  # a weight error of the same order (HQQ minimises another norm)
    # the refined layer is not the round-to-nearest one
    plain = copy.deepcopy(m)
    qbackend.quantize_(plain, {"preset": preset, "min_params": 0})
    with torch.no_grad():
        assert not torch.equal(plain(x), q(x))


def test_explain_shows_the_per_layer_error_before_and_after():
    torch._dynamo.reset()
    report = qbackend.explain(_net(), torch.randn(2, 5, 128), **_opts())
    table = report.sections["hqq"][0].table()
    assert "RTN err" in table and "hqq err" in table and "up" in table and "weight errors (no data)" in table


def test_saved_and_reloaded_hqq_model_gives_identical_outputs_without_rerunning(tmp_path, monkeypatch):
    q = _net()
    qbackend.quantize_(q, _opts("int4"))
    x = torch.randn(2, 9, 128)
    with torch.no_grad():
        before = q(x)
    qbackend.save(q, tmp_path / "m.safetensors")

    def no_rerun(*a, **k):
        raise AssertionError("HQQ ran on load")

    monkeypatch.setattr("qbackend.workflows.weight_only.method.hqq_quantize", no_rerun)
    loaded = qbackend.load(tmp_path / "m.safetensors", model=Net().eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), before)


def test_a_format_hqq_does_not_refine_is_an_error_naming_the_layer_unless_rtn_fallback_is_asked():
    with pytest.raises(FormatError, match="up: method 'hqq' refines nf4, fp4, int4 only; got int8"):
        qbackend.quantize_(_net(), _opts("int8"))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="up: method 'hqq' refines nf4, fp4, int4 only"):
        with torch.no_grad():
            torch.compile(_net(), backend="qbackend", options=_opts("int8"))(torch.randn(2, 128))
    torch._dynamo.reset()
    report = qbackend.quantize_(_net(), _opts("int8", fallback="rtn"))
    rows = report.sections["hqq"][0].rows
    assert [r.method for r in rows] == ["rtn", "rtn"] and all(r.note.startswith("fallback:") for r in rows)
    assert report.layer("up").quantized


def test_bad_hqq_options_are_config_errors():
    with pytest.raises(ConfigError, match="method 'hqq' uses no calibration"):
        QuantConfig.from_options({"method": "hqq", "calibration": object()})
    with pytest.raises(ConfigError, match=r"method lp_norm must be a number in \(0, 1\]"):
        QuantConfig.from_options({"method": {"name": "hqq", "lp_norm": 1.5}})
    with pytest.raises(ConfigError, match="method iters must be an int >= 0"):
        QuantConfig.from_options({"method": {"name": "hqq", "iters": -1}})
    assert QuantConfig.from_options({"method": {"name": "hqq", "beta": 1e3}}).method.beta == 1e3


def test_quantize_shows_a_layer_by_layer_progress_bar_with_each_layers_time(capfd):
    qbackend.quantize_(_net(), _opts("nf4"))
    err = capfd.readouterr().err
    assert "hqq" in err and "2/2" in err and "layer" in err
    assert any(f"{name} " in err and "s]" in err for name in ("up", "down"))
