"""QAT training through torch.compile: autograd, optimizers, train/eval and grad-mode switches, gradient
accumulation, checkpoints, compile counts, and deployment of the trained model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.testing import CompileCounterWithBackend

import qbackend
from qbackend.core.backend import guard_weights, run_passes
from qbackend.core.backend import qbackend as qbackend_backend
from qbackend.core.config import QuantConfig
from qbackend.qat import QATConfig, eager_qat, prepare

OPTS = {"preset": "nf4", "min_params": 0, "qat": QATConfig(learnable_scales=True, activations="static")}


class Net(nn.Module):
    def __init__(self, seed: int = 0, widths: tuple[int, ...] = (72, 100, 40, 8)) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def passes_on_aot_eager(options) -> CompileCounterWithBackend:
    """qbackend's passes and weight guard with AOT autograd but no Inductor (fast compiles), counted."""
    config = QuantConfig.from_options(options)

    def backend(gm, example_inputs):
        result = run_passes(gm, config)
        return guard_weights(aot_eager(gm, example_inputs), result, config)

    return CompileCounterWithBackend(backend)


def qbackend_counted(options) -> CompileCounterWithBackend:
    return CompileCounterWithBackend(lambda gm, ex: qbackend_backend(gm, ex, options=options))


def _train_step(model, opt, x, target):
    loss = ((model(x) - target) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_training_through_the_real_backend():
    """Inductor path: compiled QAT training == eager QAT reference; switches recompile only for no_grad."""
    net = Net()
    prepare(net, OPTS)
    ref = copy.deepcopy(net)
    counter = qbackend_counted(OPTS)
    cnet = torch.compile(net, backend=counter)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 72, generator=g), torch.randn(6, 8, generator=g)) for _ in range(4)]
    for x, t in data:
        loss = _train_step(cnet, opt, x, t)
        with eager_qat(ref):
            loss_ref = _train_step(ref, opt_ref, x, t)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    assert torch.equal(net.layers[0].qat.act_absmax, ref.layers[0].qat.act_absmax)
    assert counter.frame_count == 1  # no recompile per step: optimizer updates are in-place input changes

    x = data[0][0]
    net.eval()
    absmax = net.layers[1].qat.act_absmax.clone()
    y_eval = cnet(x)  # grad enabled, eval: the QAT graph, observers frozen by the flag (no recompile)
    assert counter.frame_count == 1
    assert torch.equal(net.layers[1].qat.act_absmax, absmax)
    with torch.no_grad():
        y_dep = cnet(x)  # inference: one more compile, the real NF4 ops
        assert counter.frame_count == 2
        converted = qbackend.convert(copy.deepcopy(net))
        torch.testing.assert_close(converted(x), y_dep, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_dep, y_eval.detach(), rtol=1e-4, atol=1e-5)

    net.train()
    _train_step(cnet, opt, *data[1])  # back to training: the cached graph
    with torch.no_grad():  # deployment follows the new weights and ratios (re-quantized, no recompile)
        torch.testing.assert_close(cnet(x), qbackend.convert(copy.deepcopy(net))(x), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 2


def test_dynamic_batch_sizes_do_not_recompile_every_step():
    net = Net(1)
    prepare(net, OPTS)
    counter = passes_on_aot_eager(OPTS)
    cnet = torch.compile(net, backend=counter)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    for b in (3, 5, 7, 9, 11):
        _train_step(cnet, opt, torch.randn(b, 72), torch.randn(b, 8))
    assert counter.frame_count <= 2  # the first shape, then one dynamic-batch graph


def test_gradient_accumulation_equals_the_full_batch():
    opts = {**OPTS, "qat": QATConfig(learnable_scales=True, activations="dynamic")}
    net = Net(2)
    prepare(net, opts)
    twin = copy.deepcopy(net)
    x, t = torch.randn(8, 72), torch.randn(8, 8)
    cnet = torch.compile(net, backend=passes_on_aot_eager(opts))
    for xs, ts in ((x[:4], t[:4]), (x[4:], t[4:])):
        (((cnet(xs) - ts) ** 2).mean() / 2).backward()
    ctwin = torch.compile(twin, backend=passes_on_aot_eager(opts))
    ((ctwin(x) - t) ** 2).mean().backward()
    for (n, p), (_, q) in zip(net.named_parameters(), twin.named_parameters(), strict=True):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert net.layers[0].qat.weight_ratio.grad.abs().sum() > 0


def test_checkpoint_round_trip_resumes_identically():
    net = Net(3)
    prepare(net, OPTS)
    cnet = torch.compile(net, backend=passes_on_aot_eager(OPTS))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        _train_step(cnet, opt, torch.randn(5, 72), torch.randn(5, 8))
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    keys = net.state_dict().keys()
    assert {"layers.0.qat.weight_ratio", "layers.0.qat.act_absmax", "layers.0.qat.act_observed"} <= set(keys)
    assert not any(k.endswith("observing") for k in keys)  # the train/eval flag is not checkpointed

    buf.seek(0)
    ckpt = torch.load(buf)
    restored = Net(99)
    prepare(restored, OPTS)
    restored.load_state_dict(ckpt["model"])
    opt2 = torch.optim.Adam(restored.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    crestored = torch.compile(restored, backend=passes_on_aot_eager(OPTS))
    x, t = torch.randn(5, 72), torch.randn(5, 8)
    assert torch.equal(_train_step(cnet, opt, x, t), _train_step(crestored, opt2, x, t))
    for (n, p), (_, q) in zip(net.named_parameters(), restored.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_stateless_qat_from_options_only():
    """No prepare: options={"qat": True} fake-quantizes the selected layers; weights get STE gradients."""
    opts = {"preset": "int4", "blocksize": 32, "min_params": 0, "qat": True}
    net = Net(4)
    ref = copy.deepcopy(net)
    cnet = torch.compile(net, backend=passes_on_aot_eager(opts))
    x, t = torch.randn(4, 72), torch.randn(4, 8)
    loss = ((cnet(x) - t) ** 2).mean()
    loss.backward()
    scheme = QuantConfig.from_options(opts).scheme
    h = x
    for i, layer in enumerate(ref.layers):
        h = nn.functional.linear(h, qbackend.qat.fake_quantize_weight(layer.weight, scheme), layer.bias)
        h = torch.relu(h) if i < len(ref.layers) - 1 else h
    loss_ref = ((h - t) ** 2).mean()
    loss_ref.backward()
    assert torch.equal(loss, loss_ref)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_trained_qat_model_beats_ptq():
    """A few QAT steps towards the float model's outputs recover accuracy lost by plain PTQ."""
    teacher = Net(5, (64, 256, 256, 16))
    student = copy.deepcopy(teacher)
    opts = {"preset": "nf4", "blocksize": 32, "min_params": 0, "qat": QATConfig(learnable_scales=True)}
    prepare(student, opts)
    cstudent = torch.compile(student, backend=passes_on_aot_eager(opts))
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 64, generator=g) for _ in range(8)]
    x_eval = torch.randn(256, 64, generator=g)
    with torch.no_grad():
        y_ref = teacher(x_eval)
        ptq = qbackend.convert(prepare_copy(teacher, opts))(x_eval)
    for _ in range(3):
        for x in xs:
            with torch.no_grad():
                t = teacher(x)
            _train_step(cstudent, opt, x, t)
    with torch.no_grad():
        qat = cstudent(x_eval)
    err_ptq = float((ptq - y_ref).pow(2).mean())
    err_qat = float((qat - y_ref).pow(2).mean())
    assert err_qat < 0.8 * err_ptq, (err_ptq, err_qat)


def prepare_copy(model: nn.Module, opts) -> nn.Module:
    m = copy.deepcopy(model)
    prepare(m, opts)
    return m


def test_compute_applies_to_deployment_not_training(cpu_compute):
    from qbackend.testing import capture_graph, quantized_op_nodes

    model = Net()
    opts = {**OPTS, "compute": "int8"}
    prepare(model, opts)
    x = torch.randn(4, 72)
    with torch.no_grad():  # deployed: the QAT layers' ops carry the mode like weight-only layers
        g = capture_graph(model, x)
        report = run_passes(g.gm, QuantConfig.from_options(opts)).report
    nf4 = torch.ops.qbackend.nf4_linear.default
    assert [n.args[-1] for n in quantized_op_nodes(g.gm) if n.target is nf4] == ["int8"] * 3
    assert [r.compute for r in report.layers] == ["int8"] * 3
    plain = {"preset": "nf4", "min_params": 0, "qat": QATConfig(), "compute": "int8"}
    g = capture_graph(Net(), x)  # grad enabled: training computes in fp32 (fake quant, no quantized op)
    run_passes(g.gm, QuantConfig.from_options(plain))
    assert [n for n in quantized_op_nodes(g.gm) if n.target is nf4] == []
    deployed = qbackend.convert(model, compute="int8")
    assert {m.compute for m in deployed.modules() if hasattr(m, "compute_option")} == {"int8"}
