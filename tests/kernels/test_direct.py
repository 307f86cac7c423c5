"""Direct kernel calls (qbackend.kernels.direct): compiled code and no_grad module forwards skip the
dispatcher, with the same results, and everything that needs the dispatcher still gets it."""

from __future__ import annotations

import math

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import qbackend
from qbackend.kernels import direct, ops
from qbackend.kernels.cpu import finite
from qbackend.workflows.weight_only import QuantizedLinear

PRESETS = ("nf4", "int4", "int8")


def _model(preset: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
    qbackend.quantize_(m, {"preset": preset})
    assert all(isinstance(m[i], QuantizedLinear) for i in (0, 2))
    return m


def _through_ops(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model computed with every quantized layer called as torch.ops (the dispatcher)."""

    def layer(q: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        tensors = [None if n is None else getattr(q, n) for n in q._arg_names]
        return q.op(x, *tensors, q.bias, *q.statics, q.compute)

    return layer(m[2], m[1](layer(m[0], x)))


@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_code_calls_the_kernels_directly_with_the_same_result(preset):
    m = _model(preset)
    x = torch.randn(5, 256)
    with torch.no_grad():
        want = _through_ops(m, x)
        got, codes = run_and_get_code(torch.compile(m, backend="qbackend", dynamic=False), x)
    calls = [c.split("def call")[1] for c in codes if "def call" in c]
    assert calls and all("_qbackend_kernels[" in c and "= torch.ops.qbackend" not in c for c in calls)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # Inductor's fused GELU vs eager's: ~1 ulp


def test_compiled_training_step_matches_eager_grads():
    """Below AOTAutograd the forward and the grad-input ops run directly; the gradients are unchanged."""
    m = _model("nf4", seed=1)
    m[2].bias.requires_grad_(True)
    x = torch.randn(4, 256)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    _through_ops(m, xe).square().sum().backward()
    ge, gb = xe.grad.clone(), m[2].bias.grad.clone()
    m[2].bias.grad = None
    torch._dynamo.reset()
    y, codes = run_and_get_code(torch.compile(m, backend="qbackend"), xc)
    y.square().sum().backward()
    assert any("_qbackend_kernels['nf4_linear']" in c for c in codes)
    torch.testing.assert_close(xc.grad, ge, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m[2].bias.grad, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_no_grad_module_forward_skips_the_dispatcher(preset, monkeypatch):
    m = _model(preset)
    x = torch.randn(3, 256)
    with torch.no_grad():
        want = _through_ops(m, x)
    calls: list[str] = []
    real = ops.direct_kernel

    def spy(name: str, device: str):
        calls.append(name)
        return real(name, device)

    real_fast = ops.fast_kernel

    def spy_fast(name: str, device: str):
        calls.append(name)
        return real_fast(name, device)

    monkeypatch.setattr(ops, "direct_kernel", spy)
    monkeypatch.setattr(ops, "fast_kernel", spy_fast)
    with torch.no_grad():
        got = m(x)
    assert torch.equal(got, want) and calls == [m[0].op._opname, m[2].op._opname]


def test_dispatcher_kept_where_it_is_needed():
    """Grad to record, fake tensors, tracing: the op path (autograd, fake kernels) as before."""
    m = _model("int8")
    x = torch.randn(2, 256, requires_grad=True)
    assert direct._dispatch_needed(x, None)
    y = m(x)
    assert y.grad_fn is not None  # autograd recorded through the op
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not direct._dispatch_needed(x.detach(), None)
    with torch.no_grad():
        assert not direct._dispatch_needed(x, None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(2, 256))
        assert direct._dispatch_needed(fx, None)
    with torch.no_grad():
        exported = torch.export.export(m, (torch.randn(2, 256),))
    assert any("qbackend" in str(n.target) for n in exported.graph.nodes)  # the op is in the graph


def test_no_grad_forward_still_validates():
    m = _model("nf4")
    with torch.no_grad(), pytest.raises(ValueError, match="in_features"):
        m[0](torch.randn(2, 255))
    with torch.no_grad(), pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        m[0](torch.randint(0, 3, (2, 256)))


def test_direct_kernel_output_never_aliases_its_input():
    def identity(x, *rest):
        return x

    fam = ops.FAMILIES["int8"]
    fn = ops._direct(fam, identity, grad=False)
    x = torch.randn(2, 3)
    y = fn(x, None, None, None, 3, 3, compute="fp32")
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_finite_check_by_sum_keeps_nan_rows_and_redoes_overflowing_ones():
    def overflowing(x, bias):  # overflows above |x| ~ 1e30 like an unscaled partial sum, else exact
        y = x * 2.0
        return torch.where(x.abs() > 1e30, torch.full_like(x, math.inf), y)

    run = finite.keep_finite(overflowing, bias_at=1)
    x = torch.tensor([[1.0, 2.0], [1e36, -1e36], [math.nan, 1.0]])
    y = run(x, None)
    assert torch.equal(y[0], torch.tensor([2.0, 4.0]))
    assert torch.equal(y[1], torch.tensor([2e36, -2e36]))  # redone on 2^-k-scaled input
    assert math.isnan(float(y[2, 0]))  # a non-finite input row stays non-finite
    # finite elements whose sum overflows: the exact check runs, nothing is redone
    big = torch.full((4, 2), 3e38)
    assert torch.equal(finite.keep_finite(lambda x, b: x.clone(), bias_at=1)(big, None), big)


def test_cache_key_pass_changes_nothing_and_names_the_codegen():
    p = direct.cache_key_pass()
    g = torch.fx.symbolic_trace(torch.nn.Linear(2, 2)).graph
    before = str(g)
    p(g)
    assert str(g) == before and p.uuid() == direct.CODEGEN_VERSION


@pytest.mark.parametrize("preset", ("nf4", "int8"))
def test_quantized_modules_compile_to_one_graph(preset):
    """The module's direct-call checks are not traced by Dynamo (a graph break per layer would cost more
    than the dispatcher saves)."""
    m = _model(preset)
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(m, backend="qbackend", fullgraph=True, dynamic=False)(torch.randn(3, 256))
    assert y.shape == (3, 128)
