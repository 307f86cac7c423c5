"""``method="awq"`` through torch.compile, quantize_, explain and save/load (the input multiply 1/s included)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qbackend
from qbackend import QuantConfig
from qbackend.core.config import ConfigError
from qbackend.formats.gptq import CalibrationDataError
from qbackend.workflows.weight_only import QuantizedLinear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(128)
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)
        self.unused = nn.Linear(128, 128)  # only on the branch calibration never takes
        self.branch = False

    def forward(self, x):
        h = self.down(torch.nn.functional.gelu(self.up(self.ln(x))))
        return self.unused(h) if self.branch else h


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # a few large input channels, as in trained transformers
        net.ln.weight.mul_(1 + 8 * (torch.arange(128) % 17 == 0))
    return net


@pytest.fixture(scope="module")
def cal():
    g = torch.Generator().manual_seed(1)
    return qbackend.calibrate(_net(), [torch.randn(4, 64, 128, generator=g) for _ in range(4)], hessian=True,
                              progress=False)  # fmt: skip


def _opts(cal, preset="int4", exclude=("unused",), **method):
    method = {"name": "awq", "grid": 10, "fold": False, **method}  # per-layer multiplies (folds: test_awq_fold.py)
    return {"preset": preset, "min_params": 0, "exclude": list(exclude), "method": method, "calibration": cal}


@pytest.mark.parametrize("preset", ["nf4", "int4", "int8"])
def test_compiled_and_module_forms_agree_and_report_error_and_the_multiply(cal, preset):
    x = torch.randn(3, 7, 128)
    m = _net()
    torch._dynamo.reset()
    with torch.no_grad():
        y_compiled = torch.compile(m, backend="qbackend", options=_opts(cal, preset))(x)
    q = copy.deepcopy(m)
    report = qbackend.quantize_(q, _opts(cal, preset))
    with torch.no_grad():
        torch.testing.assert_close(q(x), y_compiled, rtol=1e-5, atol=1e-5)
    rows = {r.layer: r for r in report.sections["awq"][0].rows}
    assert set(rows) == {"up", "down"}
    for r in rows.values():
        assert r.error <= r.rtn_error and r.tokens == 1024 and r.input_scale in ("multiply", "none")
        assert "alpha=" in r.note or r.note.startswith("round to nearest kept")
    assert rows["up"].input_scale == "multiply" and rows["up"].error < 0.95 * rows["up"].rtn_error
    assert isinstance(q.up, QuantizedLinear) and q.up.input_scale is not None
    # the stored weight is W * s: with the multiply it reproduces W x up to the format's error
    w = m.up.weight.detach()
    assert (q.up.dequantized_weight() - w).norm() / w.norm() < 0.2


def test_explain_shows_error_before_and_after_and_where_1_over_s_went(cal):
    torch._dynamo.reset()
    report = qbackend.explain(_net(), torch.randn(2, 5, 128), **_opts(cal, fold=False))
    table = report.sections["awq"][0].table()
    assert "RTN err" in table and "1/s" in table and "multiply" in table and "alpha=" in table
    torch._dynamo.reset()  # by default, up's 1/s is folded into the LayerNorm feeding only it
    folded = qbackend.explain(_net(), torch.randn(2, 5, 128), **_opts(cal, fold=True)).sections["awq"][0].table()
    assert "folded" in folded and "layer_norm -> ln" in folded
    # the weight error of a layer with 1/s is of the weight it computes with (its codes hold W * s)
    rtn = qbackend.explain(_net(), torch.randn(2, 5, 128), preset="int4", min_params=0, exclude=["unused"])
    assert report.layer("up").rel_error < 1.25 * rtn.layer("up").rel_error


def test_saved_and_reloaded_awq_model_gives_identical_outputs_without_rerunning(cal, tmp_path, monkeypatch):
    q = _net()
    qbackend.quantize_(q, _opts(cal, "nf4"))
    assert q.up.input_scale is not None
    x = torch.randn(2, 9, 128)
    with torch.no_grad():
        before = q(x)
    qbackend.save(q, tmp_path / "m.safetensors")

    def no_rerun(*a, **k):
        raise AssertionError("AWQ ran on load")

    monkeypatch.setattr("qbackend.workflows.weight_only.method.awq_quantize", no_rerun)
    loaded = qbackend.load(tmp_path / "m.safetensors", model=Net().eval())
    assert torch.equal(loaded.up.input_scale, q.up.input_scale)
    with torch.no_grad():
        assert torch.equal(loaded(x), before)


def test_a_layer_calibration_never_reached_is_an_error_naming_it_unless_rtn_fallback_is_asked(cal):
    m = _net()
    m.branch = True
    with pytest.raises(CalibrationDataError, match="unused.*no calibration batch reached it.*fallback"):
        qbackend.quantize_(copy.deepcopy(m), _opts(cal, exclude=()))
    report = qbackend.quantize_(m, _opts(cal, exclude=(), fallback="rtn"))
    row = {r.layer: r for r in report.sections["awq"][0].rows}["unused"]
    assert row.method == "rtn" and row.note.startswith("fallback:")
    assert report.layer("unused").quantized and m.unused.input_scale is None


def test_too_few_tokens_missing_statistics_and_unsupported_combinations_are_clear_errors():
    m = _net()
    small = qbackend.calibrate(m, [torch.randn(1, 8, 128)], hessian=True, progress=False)
    with pytest.raises(CalibrationDataError, match="up: calibration saw only 8 tokens.*min_tokens=64"):
        qbackend.quantize_(copy.deepcopy(m), _opts(small))
    no_h = qbackend.calibrate(m, [torch.randn(1, 80, 128)], progress=False)
    with pytest.raises(CalibrationDataError, match=r"up: the calibration holds no X\^T X.*hessian=True"):
        qbackend.quantize_(copy.deepcopy(m), _opts(no_h))
    with pytest.raises(ConfigError, match="method and smoothquant cannot be combined"):  # W8A8 is not weight-only
        QuantConfig.from_options({"preset": "w8a8", "method": "awq", "calibration": small})
    with pytest.raises(ConfigError, match="max_shrink must be a number in"):
        QuantConfig.from_options({"method": {"name": "awq", "max_shrink": 1}, "calibration": small})
    with pytest.raises(ConfigError, match="needs calibration data"):
        QuantConfig.from_options({"preset": "nf4", "method": "awq"})


def test_an_older_calibration_without_mean_abs_x_is_an_error_saying_to_recalibrate(cal):
    old = copy.copy(cal)
    old.layers = {k: copy.copy(v) for k, v in cal.layers.items()}
    old._fingerprint = None
    for st in old.layers.values():
        st.absmean = None
    with pytest.raises(CalibrationDataError, match="up: the calibration holds no mean"):
        qbackend.quantize_(_net(), _opts(old))


def test_sharding_an_awq_layer_is_refused_with_a_clear_error_not_a_dropped_multiply(cal):
    from qbackend.distributed.layout import ShardableQuantizedLinear, ShardingError

    q = _net()
    qbackend.quantize_(q, _opts(cal))
    with pytest.raises(ShardingError, match="up: AWQ layers .* cannot be sharded yet"):
        ShardableQuantizedLinear(q.up, "up")


def test_a_weight_changed_in_place_is_requantized_with_new_scales_in_the_compiled_graph(cal):
    x = torch.randn(2, 5, 128)
    m = _net()
    torch._dynamo.reset()
    # per-layer multiplies: a layer whose 1/s is folded keeps that s on a re-run (the norm holds 1/s)
    compiled = torch.compile(m, backend="qbackend", options=_opts(cal))
    with torch.no_grad():
        compiled(x)
        m.up.weight.mul_(torch.linspace(0.5, 2.0, 128))  # a change the old 1/s does not fit
        after = compiled(x)
    fresh = copy.deepcopy(m)
    qbackend.quantize_(fresh, _opts(cal))
    with torch.no_grad():
        torch.testing.assert_close(after, fresh(x), rtol=1e-5, atol=1e-5)
