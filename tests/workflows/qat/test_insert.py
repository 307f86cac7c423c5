"""The QAT pass on Dynamo graphs (no Inductor): every linear form, every format, prepared and stateless.

* grad enabled: the rewritten graph == the eager QAT reference (fake-quantized weights/inputs);
* no_grad: the deployed graph (quantized ops) == the QAT forward within float rounding, and
  ``qbackend.convert`` == the deployed graph exactly (prepare and convert numerics identical).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qbackend
from qbackend.core.backend import run_passes
from qbackend.core.config import QuantConfig
from qbackend.qat import QATConfig, prepare
from qbackend.testing import assert_lints, capture_graph, linear_models, quant_configs
from qbackend.testing.strategies import FORMS
from qbackend.workflows.qat.fake_quant import fake_quantize_weight

FQ_W = torch.ops.qbackend.qat_fake_quant_weight.default


def _fq_params(model: nn.Module, scheme) -> dict[str, torch.Tensor]:
    """Every 2-D parameter replaced by its fake-quantized value (in the linear's [out, in] orientation)."""
    out = {}
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        layer = name.rsplit(".", 1)[0] if "." in name else name
        transposed = name.startswith("w") and FORMS[model.spec.layers[int(layer[1:])].form]
        w = p.detach().t() if transposed else p.detach()
        fq = fake_quantize_weight(w, scheme)
        out[name] = fq.t() if transposed else fq
    return out


@settings(max_examples=15)
@given(case=linear_models(max_layers=3), config=quant_configs())
def test_stateless_qat_matches_fake_quant_reference_in_every_form(case, config):
    config = config.replace(qat=QATConfig())
    x = case.inputs[0]
    graph = capture_graph(case.model, x)  # grad enabled: the training graph
    ref = torch.func.functional_call(case.model, _fq_params(case.model, config.scheme), (x,))
    result = run_passes(graph.gm, config)
    assert_lints(graph.gm)
    fq_nodes = [n for n in graph.gm.graph.nodes if n.target is FQ_W]
    assert len(fq_nodes) == len({id(p) for p in case.model.parameters() if p.dim() == 2})  # tied: one per weight
    assert all("fake-quantized" in r.reason for r in result.report.layers)
    (out,) = graph.run()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Idempotent: nothing left to rewrite.
    code = graph.gm.code
    run_passes(graph.gm, config)
    assert graph.gm.code == code

    # no_grad: the backend deploys the same format; outputs agree within float rounding.
    with torch.no_grad():
        deployed = capture_graph(case.model, x)
        run_passes(deployed.gm, config)
        (dep,) = deployed.run()
    torch.testing.assert_close(dep, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-5)


class Net(nn.Module):
    """Linear layers with widths that are not multiples of the block sizes, relu between them."""

    def __init__(self, widths: tuple[int, ...], bias: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def qat_reference(net: Net, x: torch.Tensor) -> torch.Tensor:
    """The eager QAT forward: each layer's ``LinearQAT`` (fake-quantized input and weight)."""
    for i, layer in enumerate(net.layers):
        x = layer.qat(x, layer.weight, layer.bias)
        if i < len(net.layers) - 1:
            x = torch.relu(x)
    return x


@st.composite
def prepared_nets(draw: st.DrawFn):
    widths = tuple(draw(st.lists(st.sampled_from([16, 33, 48, 64, 100, 130]), min_size=2, max_size=4)))
    config = draw(quant_configs())
    activations = draw(st.sampled_from(["none", "dynamic", "static"]))
    qat = QATConfig(learnable_scales=draw(st.booleans()), activations=activations)
    net = Net(widths, draw(st.booleans()), draw(st.integers(0, 999)))
    opts = config.replace(qat=qat)
    prepare(net, opts)
    g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    with torch.no_grad():
        for layer in net.layers:
            if qat.learnable_scales:  # trained ratios: some clip, some at the cap
                layer.qat.weight_ratio.copy_(0.5 + 0.7 * torch.rand(layer.qat.weight_ratio.shape, generator=g))
            if qat.activations == "static":  # a trained observer
                layer.qat.act_absmax.fill_(float(torch.rand((), generator=g)) * 3 + 0.5)
                layer.qat.act_observed.fill_(True)
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    x = torch.randn(*batch, widths[0], generator=g)
    return net, x, opts


@settings(max_examples=12)
@given(prepared_nets())
def test_prepared_qat_training_graph_deploy_and_convert_agree(case):
    net, x, opts = case
    net.eval()  # observers frozen: the reference and the graph see the same scales
    ref = qat_reference(copy.deepcopy(net), x)

    graph = capture_graph(net, x)
    run_passes(graph.gm, opts)
    assert_lints(graph.gm)
    (out,) = graph.run()
    assert torch.equal(out, ref)  # the same ops on the same values: bit for bit

    with torch.no_grad():
        deployed = capture_graph(net, x)
        result = run_passes(deployed.gm, opts)
        (dep,) = deployed.run()
    assert all(r.quantized for r in result.report.layers)
    torch.testing.assert_close(dep, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-5)

    converted = qbackend.convert(copy.deepcopy(net))
    with torch.no_grad():
        assert torch.equal(converted(x), dep)  # same kernels, same tensors


@settings(max_examples=60)
@given(prepared_nets())
def test_convert_matches_qat_forward_on_many_shapes(case):
    """Deployed modules (real quantized ops) == the eager QAT forward within float rounding."""
    net, x, _ = case
    net.eval()
    with torch.no_grad():
        ref = qat_reference(net, x)
        dep = qbackend.convert(copy.deepcopy(net))(x)
    torch.testing.assert_close(dep, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-5)


def test_stateless_layers_without_prepare_warn_and_use_absmax(caplog):
    net = Net((64, 48, 32), True, 0)
    x = torch.randn(3, 64)
    opts = QuantConfig(min_params=0, qat=QATConfig(learnable_scales=True, activations="static"))
    graph = capture_graph(net, x)
    with caplog.at_level("WARNING", logger="qbackend"):
        run_passes(graph.gm, opts)
    assert "no QAT state" in caplog.text
    (out,) = graph.run()
    ref = F.linear(torch.relu(F.linear(x, fake_quantize_weight(net.layers[0].weight, opts.scheme), net.layers[0].bias)),
                   fake_quantize_weight(net.layers[1].weight, opts.scheme), net.layers[1].bias)  # fmt: skip
    assert torch.equal(out, ref)


def test_qat_off_leaves_training_graph_to_the_backend():
    net = Net((64, 48), True, 0)
    graph = capture_graph(net, torch.randn(2, 64))
    run_passes(graph.gm, QuantConfig(min_params=0))
    assert not any(n.target is FQ_W for n in graph.gm.graph.nodes)
