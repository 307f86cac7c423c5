"""No stale result from any weight-update idiom: each is detected on the next call (re-quantized, or
`StaleWeightError` where the quantized form cannot be refreshed), or refreshed by ``qbackend.refresh``."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import qbackend
from qbackend import StaleWeightError
from qbackend.passes import weight_cache

OPTS = {"preset": "int8", "min_params": 0}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _expected(model: nn.Module, x: torch.Tensor, opts=OPTS) -> torch.Tensor:
    """What a fresh quantization of the model's current weights computes (eager module form)."""
    m = copy.deepcopy(model)
    qbackend.quantize_(m, opts)
    with torch.no_grad():
        return m(x)


def _check_fresh(model: nn.Module, compiled, x: torch.Tensor, opts=OPTS) -> None:
    with torch.no_grad():
        got = compiled(x)
    torch.testing.assert_close(got, _expected(model, x, opts), rtol=1e-5, atol=1e-5)


X = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))


def _new_w(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


# Each idiom changes model.a.weight (or the whole model) after the first compiled call.
def _inplace(m):
    with torch.no_grad():
        m.a.weight.mul_(0.5)


def _data_copy(m):
    m.a.weight.data.copy_(_new_w(m.a.weight.shape))


def _data_mul(m):
    m.a.weight.data.mul_(0.9)


def _data_setitem(m):
    m.a.weight.data[...] = _new_w(m.a.weight.shape)


def _data_first_row(m):
    m.a.weight.data[0] = 3.0


def _ema(m):  # the EMA / weight-sync idiom
    target = _new_w(m.a.weight.shape)
    m.a.weight.data.mul_(0.9).add_(0.1 * target)


def _load_state_dict(m):
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["a.weight"] = _new_w(m.a.weight.shape)
    m.load_state_dict(sd)


def _param_copy(m):
    with torch.no_grad():
        m.a.weight.copy_(_new_w(m.a.weight.shape))


def _optimizer_step(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(X).sum().backward()
    opt.step()
    opt.zero_grad()


def _replace_parameter(m):
    m.a.weight = nn.Parameter(_new_w(m.a.weight.shape))


def _data_assign(m):
    m.a.weight.data = _new_w(m.a.weight.shape)


def _numpy_view(m):
    m.a.weight.detach().numpy()[:] = _new_w(m.a.weight.shape).numpy()


IDIOMS = {
    "in-place op": _inplace,
    "w.data.copy_": _data_copy,
    "w.data.mul_": _data_mul,
    "w.data[...] = v": _data_setitem,
    "w.data[0] = v (first row)": _data_first_row,
    "EMA via .data": _ema,
    "load_state_dict": _load_state_dict,
    "param.copy_": _param_copy,
    "optimizer.step": _optimizer_step,
    "replace the Parameter": _replace_parameter,
    "w.data = new tensor": _data_assign,
    "numpy view": _numpy_view,
}


@pytest.mark.parametrize("idiom", list(IDIOMS))
def test_each_update_idiom_is_seen_on_the_next_call(idiom):
    m = _net()
    c = torch.compile(m, backend="qbackend", options=OPTS)
    _check_fresh(m, c, X)
    IDIOMS[idiom](m)
    _check_fresh(m, c, X)


def test_an_alias_taken_before_compiling_is_seen():
    m = _net()
    alias = m.a.weight.data  # e.g. a weight-sync buffer kept by the training code
    c = torch.compile(m, backend="qbackend", options=OPTS)
    _check_fresh(m, c, X)
    alias.copy_(_new_w(alias.shape))
    _check_fresh(m, c, X)


def test_model_to_another_dtype_gives_that_models_output():
    m = _net()
    c = torch.compile(m, backend="qbackend", options=OPTS)
    _check_fresh(m, c, X)
    m.to(torch.bfloat16)
    xb = X.to(torch.bfloat16)
    with torch.no_grad():
        got = c(xb)
    torch.testing.assert_close(got, _expected(m, xb), rtol=2e-2, atol=2e-2)


def test_a_model_built_under_inference_mode_is_checked():
    with torch.inference_mode():
        m = _net()
        c = torch.compile(m, backend="qbackend", options=OPTS)
        _check_fresh(m, c, X)
        m.a.weight.mul_(0.5)  # an inference tensor: no version counter
        _check_fresh(m, c, X)


def test_on_weight_change_error_raises_for_a_data_write():
    opts = {**OPTS, "on_weight_change": "error"}
    m = _net()
    c = torch.compile(m, backend="qbackend", options=opts)
    _check_fresh(m, c, X, opts)
    m.a.weight.data.mul_(0.5)
    with pytest.raises(StaleWeightError, match="'a' was changed in place after compiling .on_weight_change='error'"):
        with torch.no_grad():
            c(X)


def test_inductor_freezing_raises_for_a_data_write():
    opts = {**OPTS, "inductor": {"freezing": True}}
    m = _net()
    c = torch.compile(m, backend="qbackend", options=opts)
    with torch.no_grad():
        c(X)
        m.a.weight.data.mul_(0.5)
        with pytest.raises(StaleWeightError, match="freezing baked"):
            c(X)


def test_smoothquant_folds_raise_for_a_data_write():
    m = _net()
    cal = qbackend.calibrate(m, [torch.randn(4, 64)], progress=False)
    opts = {"preset": "w8a8", "calibration": cal, "min_params": 0}
    c = torch.compile(m, backend="qbackend", options=opts)
    with torch.no_grad():
        c(X)
        m.b.weight.data.mul_(0.5)
        with pytest.raises(StaleWeightError, match="SmoothQuant folded"):
            c(X)


def _sparse_write(m):
    """One element in the middle of the weight: away from every sampled byte."""
    w = m.a.weight.data
    w.view(-1)[w.numel() // 2 + 37] += 5.0


def test_a_sparse_data_write_is_missed_by_sampling_but_refreshed_explicitly():
    m = _net()
    c = torch.compile(m, backend="qbackend", options=OPTS)
    _check_fresh(m, c, X)
    stale = _expected(m, X)
    _sparse_write(m)
    with torch.no_grad():
        got = c(X)
    torch.testing.assert_close(got, stale)  # documented limit of sampling: this write is not seen
    assert qbackend.refresh(c) >= 1
    _check_fresh(m, c, X)


def test_strict_mode_sees_a_sparse_data_write():
    opts = {**OPTS, "weight_check": "full"}
    m = _net()
    c = torch.compile(m, backend="qbackend", options=opts)
    _check_fresh(m, c, X, opts)
    _sparse_write(m)
    _check_fresh(m, c, X, opts)


def test_refresh_makes_folded_constants_raise():
    m = _net()
    cal = qbackend.calibrate(m, [torch.randn(4, 64)], progress=False)
    c = torch.compile(m, backend="qbackend", options={"preset": "w8a8", "calibration": cal, "min_params": 0})
    with torch.no_grad():
        c(X)
        qbackend.refresh(m)
        with pytest.raises(StaleWeightError, match="SmoothQuant folded"):
            c(X)


def test_refresh_refuses_a_non_module():
    with pytest.raises(TypeError, match="takes an nn.Module"):
        qbackend.refresh(torch.zeros(3))


def test_a_write_racing_a_requantization_is_seen_on_the_next_call(monkeypatch):
    """The stamp is taken before quantizing: a write landing while quantizing is not lost."""
    m = _net()
    c = torch.compile(m, backend="qbackend", options=OPTS)
    _check_fresh(m, c, X)
    real = weight_cache._quantize
    raced = threading.Event()

    def quantize_then_race(param, *a, **k):
        out = real(param, *a, **k)
        if not raced.is_set() and param.shape == m.a.weight.shape:
            raced.set()
            param.data.mul_(0.25)  # lands after the values were read, before the entry is updated
        return out

    monkeypatch.setattr(weight_cache, "_quantize", quantize_then_race)
    m.a.weight.data.mul_(2.0)
    with torch.no_grad():
        c(X)  # re-quantizes; the racing write lands meanwhile
    assert raced.is_set()
    monkeypatch.setattr(weight_cache, "_quantize", real)
    _check_fresh(m, c, X)


def test_concurrent_calls_after_a_write_agree():
    m = _net()
    c = torch.compile(m, backend="qbackend", options=OPTS)
    _check_fresh(m, c, X)
    m.a.weight.data.mul_(0.5)
    outs, errors = [], []

    def call():
        try:
            with torch.no_grad():
                outs.append(c(X))
        except Exception as e:  # noqa: BLE001  (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    want = _expected(m, X)
    for o in outs:
        torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def device_probes(monkeypatch):
    """CPU weights fingerprinted as device weights are (byte runs read by one batched Triton launch,
    here through the interpreter); yields the list of launches made."""
    from qbackend.passes import weight_stamp

    monkeypatch.setattr(weight_stamp, "PROBED_DEVICES", {"cpu", "cuda"})
    launches: list[int] = []
    real = weight_stamp._read_runs
    monkeypatch.setattr(weight_stamp, "_read_runs", lambda addrs: launches.append(len(addrs)) or real(addrs))
    return launches


@pytest.mark.parametrize("idiom", list(IDIOMS))
def test_each_update_idiom_is_seen_with_batched_device_probes(idiom, device_probes):
    m = _net()
    c = torch.compile(m, backend="qbackend", options=OPTS)
    _check_fresh(m, c, X)
    calls = len(device_probes)
    with torch.no_grad():
        c(X)
    assert device_probes[calls:] == [16]  # one launch reads both layers' 8 runs
    IDIOMS[idiom](m)
    _check_fresh(m, c, X)
