"""W8A8 lowering, the outlier op, the "w8a8" preset end to end, and the no-runtime-op guarantee of exact folds."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import qbackend
from qbackend.core.backend import StaleWeightError, run_passes
from qbackend.core.config import ConfigError, QuantConfig
from qbackend.formats import Scheme, quantize
from qbackend.kernels import ops as _ops  # noqa: F401  (registers the op)
from qbackend.kernels import reference as ref
from qbackend.testing import assert_idempotent, assert_lints, assert_lowers_reported, capture_graph, linear_models
from qbackend.workflows.w8a8.fold import NODE_META

W8 = Scheme("int", 8, granularity="channel")


# ---- qbackend::w8a8_outlier_linear ----------------------------------------------------------------


def _weight(n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    qw = quantize(w, W8)
    return qw.codes.reshape(-1), qw.scale.reshape(-1).float()


def test_outlier_op_decomposes_exactly_and_matches_w8a8_without_outliers():
    n, k = 24, 40
    codes, scale = _weight(n, k)
    bias = torch.randn(n)
    x = torch.randn(3, 5, k)
    op = torch.ops.qbackend.w8a8_outlier_linear
    no_outliers = op(x, codes, scale, bias, None, 6.0, n, k)
    torch.testing.assert_close(no_outliers, ref.w8a8_linear(x, codes, scale, bias, None, n, k))
    x[1, 2, 7] = 9.0  # column 7 becomes an outlier for every token
    x[..., 30] *= 25
    y = op(x, codes, scale, bias, None, 6.0, n, k)
    w = codes.view(n, k).float() * scale[:, None]
    cols = torch.tensor([7, 30])
    regular = x.clone()
    regular[..., cols] = 0
    expected = ref.w8a8_linear(regular, codes, scale, bias, None, n, k) + x[..., cols] @ w[:, cols].t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    exact = x @ w.t() + bias
    plain = ref.w8a8_linear(x, codes, scale, bias, None, n, k)
    assert (y - exact).norm() < 0.5 * (plain - exact).norm()  # the outliers no longer spoil the int8 scale
    static = op(x, codes, scale, None, torch.tensor([0.02]), 6.0, n, k)  # per-tensor static for the int8 part
    assert static.shape == (3, 5, n) and bool(torch.isfinite(static).all())


def test_outlier_op_opcheck_and_gradient():
    n, k = 8, 16
    codes, scale = _weight(n, k, 1)
    x = torch.randn(4, k)
    x[:, 3] = 10.0
    torch.library.opcheck(torch.ops.qbackend.w8a8_outlier_linear, (x, codes, scale, torch.randn(n), None, 6.0, n, k))
    xg = x.clone().requires_grad_(True)
    b = torch.zeros(n, requires_grad=True)
    torch.ops.qbackend.w8a8_outlier_linear(xg, codes, scale, b, None, 6.0, n, k).sum().backward()
    w = codes.view(n, k).float() * scale[:, None]
    torch.testing.assert_close(xg.grad, torch.ones(4, n) @ w)  # straight-through, like w8a8_linear
    torch.testing.assert_close(b.grad, torch.full((n,), 4.0))
    with pytest.raises(ValueError, match="threshold"):
        torch.ops.qbackend.w8a8_outlier_linear(x, codes, scale, None, None, 0.0, n, k)


# ---- the pipeline on captured graphs (no Inductor) ----------------------------------------------------


class RMSNorm(nn.Module):
    """LlamaRMSNorm's code, as Dynamo traces it (pow / mean / rsqrt / mul by the weight)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaBlock(nn.Module):
    """A pre-norm Llama-like block: RMSNorm -> q/k/v, o, RMSNorm -> gate/up (SwiGLU) -> down."""

    def __init__(self, d: int = 64, f: int = 128) -> None:
        super().__init__()
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = self.n1(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8, -1) @ self.v(h)
        x = x + self.o(a)
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _block_and_data():
    torch.manual_seed(0)
    m = LlamaBlock().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + torch.rand_like(p))
    outlier = 1 + 15 * (torch.arange(64) % 17 == 0)  # a few activation outlier channels, as in real LLMs
    xs = [torch.randn(2, 6 + i, 64) * outlier for i in range(3)]
    return m, xs


W8A8 = {"preset": "w8a8", "min_params": 0}


def _passes(model, x, **options):
    graph = capture_graph(model, x)
    reference = graph.run()
    result = run_passes(graph.gm, QuantConfig.from_options(options), measure_error=True)
    return graph, reference, result


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_smoothing_lowers_every_layer_and_beats_naive_on_outlier_channels():
    model, xs = _block_and_data()
    cal = qbackend.calibrate(model, xs, progress=False)
    naive_g, ref_out, naive = _passes(model, xs[0], **W8A8)
    sq_g, _, sq = _passes(model, xs[0], **W8A8, calibration=cal)
    assert len(sq.report.quantized) == len(naive.report.quantized) == 7
    for g, result in ((naive_g, naive), (sq_g, sq)):
        assert_lints(g.gm)
        assert_lowers_reported(g.gm, result.report)
        assert_idempotent(g.gm, lambda gm, r=result: run_passes(gm, QuantConfig.from_options({**W8A8})))
        assert {r.format for r in result.report.quantized} == {"w8a8-token"}
    kinds = {layer: grp.kind for grp in sq.fold.groups for layer in grp.layers}
    assert kinds == {"q": "param_mul", "k": "param_mul", "v": "param_mul", "o": "multiply",
                     "gate": "param_mul", "up": "param_mul", "down": "linear_rows"}  # fmt: skip
    err_naive, err_sq = _rel(naive_g.run()[0], ref_out[0]), _rel(sq_g.run()[0], ref_out[0])
    assert err_sq < 0.75 * err_naive, (err_sq, err_naive)
    # The float copies of folded weights are gone once quantized; what stays are codes and scales.
    floats = [n for n, b in sq_g.gm.named_buffers() if b.is_floating_point() and b.dim() == 2]
    assert floats == []


def test_per_tensor_static_outliers_and_fallbacks_are_reported(caplog):
    model, xs = _block_and_data()
    cal = qbackend.calibrate(model, xs, progress=False)
    del cal.layers["o"]  # as if calibration never reached it
    opts = {**W8A8, "calibration": cal, "smoothquant": {"activation": "tensor", "outlier_threshold": 6.0}}
    with caplog.at_level("INFO", logger="qbackend"):
        graph, ref_out, result = _passes(model, xs[0], **opts)
    rows = {r.name: r for r in result.report.layers}
    assert rows["q"].format == "w8a8-tensor-outliers6" and rows["o"].format == "w8a8-token-outliers6"
    assert any("o: no calibration statistics for a static activation scale" in n for n in result.notes)
    assert "not reached" in next(g.reason for g in result.fold.groups if g.layers == ("o",))
    ops = [n for n in graph.gm.graph.nodes if "w8a8_outlier_linear" in str(n.target)]
    assert len(ops) == 7 and sum(n.args[4] is not None for n in ops) == 6  # static scale everywhere but "o"
    assert _rel(graph.run()[0], ref_out[0]) < 0.05
    assert "SmoothQuant" in caplog.text


@settings(max_examples=12)
@given(case=linear_models(max_layers=3, outliers=True))
def test_w8a8_pipeline_on_generated_models(case):
    model = case.model
    x = case.inputs[0]
    cal = qbackend.calibrate(model, [x], progress=False, sample_tokens=32)
    opts = {**W8A8, "calibration": cal, "smoothquant": {"search_alpha": True, "alpha_grid": (0.25, 0.5, 0.75)}}
    graph, ref_out, result = _passes(model, x, **opts)
    assert_lints(graph.gm)
    assert_lowers_reported(graph.gm, result.report)
    out = graph.run()
    assert all(bool(torch.isfinite(o).all()) for o in out)
    assert _rel(out[0], ref_out[0]) < 0.1  # int8 x int8 through <= 3 layers: a wrong scale would be O(1)


def test_bert_like_model_gets_explicit_multiplies_and_runs():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  vocab_size=100, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 100, (2, n))} for n in (5, 7)]
    cal = qbackend.calibrate(model, batches, progress=False)
    graph = capture_graph(model, **batches[1])
    ref_out = graph.run()
    result = run_passes(graph.gm, QuantConfig.from_options({**W8A8, "calibration": cal}))
    assert len(result.report.quantized) == 7  # q, k, v, attention output, intermediate, output, pooler
    assert not result.fold.exact and len(result.fold.explicit) == 7
    muls = [n for n in graph.gm.graph.nodes if n.meta.get(NODE_META) == "explicit smoothing multiply"]
    assert len(muls) == 7
    assert _rel(graph.run()[0], ref_out[0]) < 0.05


def test_config_errors():
    cal = qbackend.smoothquant.CalibrationResult({}, 1)
    with pytest.raises(ConfigError, match="preset='w8a8'"):
        QuantConfig.from_options({"preset": "int8", "calibration": cal})
    with pytest.raises(ConfigError, match="format must be 'int8'"):
        QuantConfig.from_options({"preset": "nf4", "smoothquant": True})
    with pytest.raises(ConfigError, match=r"alpha must be a number in \[0, 1\]"):
        QuantConfig.from_options({"preset": "w8a8", "smoothquant": {"alpha": 1.5}})
    with pytest.raises(ConfigError, match="unknown smoothquant option"):
        QuantConfig.from_options({"preset": "w8a8", "smoothquant": {"alfa": 0.5}})
    with pytest.raises(ConfigError, match="CalibrationResult"):
        QuantConfig.from_options({"preset": "w8a8", "calibration": 3})
    c = QuantConfig.from_options({"preset": "w8a8", "calibration": cal, "smoothquant": {"layer_alpha": {"down": 0.8}}})
    assert c.smoothquant.alpha_for("layers.0.down") == 0.8 and c.smoothquant.alpha_for("up") == 0.5
    assert cal.fingerprint() in c.fingerprint()
    assert c.fingerprint() != c.replace(smoothquant={"alpha": 0.6}).fingerprint()
    assert QuantConfig.from_options("w8a8").smoothquant == qbackend.smoothquant.SmoothQuantConfig()


# ---- torch.compile end to end: generated code, weight changes --------------------------------------


def _kernel_sequence(code: str) -> list[str]:
    """The runtime calls of Inductor's output code, with generated kernel names made anonymous."""
    ours = r"torch\.ops\.qbackend\.[\w.]+|_qbackend_kernels\['\w+'\]"  # the op, or its CPU kernel called directly
    calls = re.findall(rf"(cpp_fused_\w+|triton_\w+|{ours}|extern_kernels\.\w+)\(", code)
    return ["kernel" if c.startswith(("cpp_fused", "triton_")) else c for c in calls]


def test_exact_folds_add_no_runtime_op_in_generated_code():
    from torch._inductor.utils import run_and_get_code

    model, xs = _block_and_data()
    cal = qbackend.calibrate(model, xs, progress=False)
    x = xs[0]
    codes = {}
    outs = {}
    variants = {
        "naive": W8A8,
        # only the exact folds (o_proj, after the attention, would need an explicit multiply)
        "exact": {**W8A8, "calibration": cal, "smoothquant": {"unfoldable": "skip"}},
    }
    for name, opts in variants.items():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="qbackend", options=opts)
        with torch.no_grad():
            outs[name], code = run_and_get_code(compiled, x)
        codes[name] = "\n".join(code)
    naive, exact = _kernel_sequence(codes["naive"]), _kernel_sequence(codes["exact"])
    assert naive.count("_qbackend_kernels['w8a8_linear']") == 7  # our CPU kernel, called directly
    assert exact == naive  # same kernels, same custom ops: the folds cost nothing at run time
    assert "smooth_inv_scale" not in codes["exact"]
    with torch.no_grad():
        expected = model(x)
    assert _rel(outs["exact"], expected) < _rel(outs["naive"], expected)

    # An unsmoothed layer's weight changed in place (o: no exact fold, skipped): re-quantized on the next call.
    with torch.no_grad():
        model.o.weight.mul_(-1.0)
        y2, expected2 = compiled(x), model(x)
    assert _rel(y2, expected2) < 0.05 and _rel(y2, outs["exact"]) > 0.05
    # A folded parameter changed in place after compiling: never silently stale.
    with torch.no_grad():
        with pytest.raises(StaleWeightError, match="n1.weight.*SmoothQuant folded"):
            model.n1.weight.mul_(2.0)
            compiled(x)
        model.n1.weight.div_(2.0)


# ---- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_smoothquant_accuracy():
    from qbackend.demo import CALIBRATION_SENTENCES, EVALUATION_SENTENCES, embedding_quality, load_minilm

    mm = load_minilm()
    model = mm.model
    cal = qbackend.calibrate(model, [mm.tokenize(CALIBRATION_SENTENCES[i : i + 16]) for i in range(0, 64, 16)],
                             progress=False)  # fmt: skip
    batch = mm.tokenize(EVALUATION_SENTENCES)
    graph = capture_graph(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def embed(outputs) -> torch.Tensor:  # mean pooling + L2 norm, as qbackend.demo.pooled_embeddings
        return F.normalize((outputs[0] * mask).sum(1) / mask.sum(1), dim=-1)

    reference = embed(graph.run())

    def cosine(options) -> float:  # the backend's passes on a copy of the graph, eager ops (no Inductor needed)
        g = graph.clone()
        run_passes(g.gm, QuantConfig.from_options({"preset": "w8a8", "calibration": cal, **options}))
        return embedding_quality(reference, embed(g.run()))["cosine_mean"]

    naive = cosine({"smoothquant": {"smooth": False}})
    sq = cosine({})
    # measured (benchmarks/results/smoothquant.md): naive 0.99743, SmoothQuant alpha 0.5 0.99914
    assert naive > 0.9970
    assert sq > 0.9989 and sq > naive + 1e-3
