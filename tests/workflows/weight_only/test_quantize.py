"""qbackend.quantize_ / QuantizedLinear (releasing float weights) and qbackend.explain (no Inductor)."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qbackend
from qbackend import QuantConfig, QuantizedLinear
from qbackend.core.backend import run_passes
from qbackend.formats import FormatError, quantize
from qbackend.testing import capture_graph, quantized_op_nodes


class Conv1D(nn.Module):  # transformers' GPT-2 Conv1D, duck-typed by quantize_
    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.fc = nn.Linear(64, 128)
        self.conv = Conv1D(64, 128)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.head = nn.Linear(64, 100, bias=False)
        self.head.weight = self.emb.weight  # tied to the embedding
        self.small = nn.Linear(64, 8)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.conv(F.gelu(self.fc(h)))
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h), self.small(h)


def test_quantize_swaps_linears_and_reports_the_rest():
    torch.manual_seed(0)
    net = Net().eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        ref = net(ids)
    report = qbackend.quantize_(net, QuantConfig(min_params=1024))
    rows = {r.name: r for r in report.layers}
    assert isinstance(net.fc, QuantizedLinear) and isinstance(net.conv, QuantizedLinear)
    assert isinstance(net.head, QuantizedLinear)
    assert isinstance(net.attn.out_proj, nn.Linear)  # MultiheadAttention reads its weight directly: kept
    assert "attn.out_proj" not in rows
    assert rows["small"].reason == "too small: 512 params < min_params=1024" and isinstance(net.small, nn.Linear)
    assert rows["conv"].transposed and rows["conv"].shape == (64, 128)
    assert net.emb.weight.shape == (100, 64)  # the tied embedding keeps its float weight
    with torch.no_grad():
        out = net(ids)
    for a, b in zip(out, ref, strict=True):
        assert F.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.98  # three NF4 layers


def test_quantized_linear_matches_the_dequantized_weight_and_frees_the_float():
    lin = nn.Linear(96, 80)
    x = torch.randn(3, 4, 96)
    w_ref = weakref.ref(lin.weight)
    qw = quantize(lin.weight.detach(), QuantConfig().scheme)
    expected = F.linear(x, qw.dequantize(), lin.bias)
    m = nn.Sequential(lin)
    del lin
    qbackend.quantize_(m, QuantConfig(min_params=0))
    gc.collect()
    assert w_ref() is None  # the float weight is gone
    assert {n for n, _ in m.named_buffers()} == {"0.codes", "0.nested_codes", "0.nested_absmax", "0.nested_offset",
                                                 "0.table", "0.nested_table"}  # fmt: skip
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m[0].dequantized_weight(), qw.dequantize(), rtol=1e-6, atol=1e-7)
    assert "format=nf4-b64-nested" in repr(m)


def test_tied_linears_share_one_quantized_copy():
    a = nn.Linear(64, 64)
    m = nn.Sequential(a, nn.ReLU(), nn.Linear(64, 64))
    m[2].weight = a.weight
    report = qbackend.quantize_(m, QuantConfig(min_params=0))
    assert m[0].codes is m[2].codes
    assert report.layers[1].bytes_after == 0  # counted once


def test_half_keeps_codes_and_constants_and_state_dict_round_trips():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    qbackend.quantize_(m, QuantConfig.preset("int4", min_params=0))
    m.half()
    assert m[0].scale.dtype == torch.float32 and m[0].codes.dtype == torch.uint8
    assert m[0].bias.dtype == torch.float16
    y = m(torch.randn(2, 64, dtype=torch.float16))
    assert y.dtype == torch.float16
    m.float()
    m2 = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    qbackend.quantize_(m2, QuantConfig.preset("int4", min_params=0))
    m2.load_state_dict(m.state_dict())
    x = torch.randn(5, 64)
    torch.testing.assert_close(m2(x), m(x))


def test_quantized_model_needs_no_lowering():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    qbackend.quantize_(m, QuantConfig.preset("int8", min_params=0))
    g = capture_graph(m, torch.randn(2, 64))
    assert len(quantized_op_nodes(g.gm)) == 2
    result = run_passes(g.gm, QuantConfig(min_params=0))
    assert result.report.layers == [] and result.nodes == 0


def test_quantize_names_a_nan_layer():
    m = nn.Sequential(nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 64)))
    with torch.no_grad():
        m[1][0].weight[0, 0] = float("inf")
    with pytest.raises(FormatError, match=r"^1\.0: contains 1 NaN/Inf"):
        qbackend.quantize_(m, QuantConfig(min_params=0))


def test_explain_reports_every_layer_with_errors_and_totals():
    torch.manual_seed(0)
    net = Net().eval()
    ids = torch.randint(0, 100, (2, 7))
    report = qbackend.explain(net, ids, preset="int8", exclude=["head"], min_params=1024)
    rows = {r.name: r for r in report.layers}
    assert rows["fc"].quantized and rows["fc"].format == "int8-sym-ch0"
    assert rows["fc"].bits_per_param == pytest.approx(8 + 32 / 64)
    assert 0 < rows["fc"].rel_error < 0.02
    assert rows["conv"].quantized and rows["conv"].forms == ("addmm+bias",) or rows["conv"].forms == ("addmm",)
    assert rows["head"].reason == "excluded by 'head'"
    assert rows["small"].reason.startswith("too small")
    # MultiheadAttention's projections run inside one opaque call: reported, not silently skipped
    why = "not lowerable: used inside multi_head_attention_forward (not decomposed into a linear)"
    assert rows["attn.out_proj"].reason == rows["attn.in_proj_weight"].reason == why
    assert report.bytes_after < report.bytes_before
    text = str(report)
    for word in ("fc", "int8-sym-ch0", "excluded by 'head'", "rel. weight error", "MB before"):
        assert word in text
    assert isinstance(net.fc, nn.Linear)  # explain does not modify the model


def test_explain_lists_prequantized_layers():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    qbackend.quantize_(m, QuantConfig(min_params=0))
    report = qbackend.explain(m, torch.randn(2, 64))
    assert [(r.name, r.quantized, r.forms) for r in report.layers] == [
        ("0", True, ("QuantizedLinear",)),
        ("2", True, ("QuantizedLinear",)),
    ]
    assert report.bytes_before == 0


def test_quantize_compute_option_resolved_per_module_and_changeable(cpu_compute, tmp_path):
    from qbackend.kernels.compute_policy import ComputeUnavailable

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40))
    x = torch.randn(3, 64)
    report = qbackend.quantize_(m, {"preset": "int4", "min_params": 0, "compute": "int8"})
    assert [r.compute for r in report.layers] == ["int8", "int8"]
    assert [(q.compute_option, q.compute) for q in (m[0], m[2])] == [("int8", "int8")] * 2
    assert "compute=int8" in repr(m[0])
    with torch.no_grad():
        y8 = m(x)
        m[0].set_compute("auto"), m[2].set_compute("auto")  # no fast kernel here: auto is fp32
        assert m[0].compute == "fp32"
        y32 = m(x)
    assert (y8 - y32).abs().max() > 0 and torch.allclose(y8, y32, atol=0.05 * float(y32.abs().max()))
    g = capture_graph(m, x)  # the module form's op call carries the mode too
    assert [n.args[-1] for n in quantized_op_nodes(g.gm)] == ["fp32", "fp32"]
    cpu_compute(features=("avx2",))
    with pytest.raises(ComputeUnavailable, match="compute='int8' needs"):
        m[0].set_compute("int8")
    assert m[0].compute == "fp32"  # unchanged by the refused request
    cpu_compute()
    rows = qbackend.explain(m, x).layers
    assert [r.compute for r in rows] == ["fp32", "fp32"]

