"""The SmoothQuant folding pass: the folded graph computes the same function (float64), for any s and alpha."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qbackend.testing import capture_graph, linear_models
from qbackend.workflows.w8a8.fold import NODE_META, smoothquant_fold
from qbackend.workflows.w8a8.scales import ScaleChoice, smoothing_scale, weight_absmax

transformers = pytest.importorskip("transformers")

TOL = 1e-9  # float64: a fold is exact up to a few roundings per element


def _outputs_close(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    worst = 0.0
    for r, o in zip(ref, out, strict=True):
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            worst = max(worst, float((o - r).detach().abs().max() / r.detach().abs().max().clamp(min=1e-30)))
    return worst


def _scale_fn(mode: str, seed: int, alpha: float):
    """Random positive s (log-uniform over 1e-3..1e3), or s from random statistics and ``alpha``."""
    g = torch.Generator().manual_seed(seed)

    def fn(group):
        k = group.in_features
        if mode == "random":
            s = torch.exp((torch.rand(k, generator=g, dtype=torch.float64) * 2 - 1) * 3 * math.log(10))
        else:
            act = torch.rand(k, generator=g, dtype=torch.float64) * 50
            act[torch.rand(k, generator=g) < 0.1] = 0.0  # dead channels must not give NaN
            s = smoothing_scale(act, weight_absmax(group.weights), alpha).double()
        return ScaleChoice(s, alpha)

    return fn


def _check_invariant(graph, mode: str, seed: int, alpha: float, unfoldable: str, explicit: str):
    ref = graph.run()
    g = graph.clone()
    report = smoothquant_fold(g.gm, _scale_fn(mode, seed, alpha), unfoldable=unfoldable, explicit=explicit)
    g.gm.graph.lint()
    assert _outputs_close(ref, g.run()) < TOL, report.table()
    return g, report


# ---- generated models (qbackend.testing): every linear form, chains, activations, tied weights -----


@settings(max_examples=25)
@given(
    case=linear_models(max_layers=4, outliers=True),
    mode=st.sampled_from(["random", "alpha"]),
    seed=st.integers(0, 2**16),
    alpha=st.floats(0.0, 1.0),
    unfoldable=st.sampled_from(["multiply", "skip"]),
    explicit=st.sampled_from(["per_layer", "shared"]),
)
def test_fold_invariant_generated_models(case, mode, seed, alpha, unfoldable, explicit):
    model = case.model.double()
    graph = capture_graph(model, case.inputs[0].double())
    _, report = _check_invariant(graph, mode, seed, alpha, unfoldable, explicit)
    spec = case.spec
    for i, (prev, layer) in enumerate(zip(spec.layers, spec.layers[1:], strict=False)):
        # A linear right after a linear (no activation, untied): its s folds into the previous rows.
        if prev.activation == "none" and layer.tie_to is None and prev.tie_to is None:
            tied_later = any(ls.tie_to in (i, i + 1) for ls in spec.layers)
            if not tied_later:
                kinds = [g.kind for g in report.groups]
                assert "linear_rows" in kinds, report.table()


# ---- real model code: HF BERT (post-LN, GELU), Llama (RMSNorm as traced, SwiGLU), GPT-2 (Conv1D addmm) --


def _bert():
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=100, max_position_embeddings=16)  # fmt: skip
    ids = torch.randint(0, 100, (2, 7))
    return transformers.BertModel(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=16)  # fmt: skip
    return transformers.LlamaModel(cfg), {"input_ids": torch.randint(0, 100, (2, 7))}


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16)
    return transformers.GPT2Model(cfg), {"input_ids": torch.randint(0, 100, (2, 7))}


_GRAPHS: dict[str, object] = {}


def _hf_graph(name: str):
    if name not in _GRAPHS:
        torch.manual_seed(0)
        model, inputs = {"bert": _bert, "llama": _llama, "gpt2": _gpt2}[name]()
        model = model.double().eval()
        with torch.no_grad():  # non-trivial norm weights and biases, so that a wrong fold shows
            for n, p in model.named_parameters():
                if p.dim() == 1 and n.endswith("weight"):
                    p.copy_(1 + 0.5 * torch.randn_like(p))
                elif n.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
        _GRAPHS[name] = capture_graph(model, **inputs)
    return _GRAPHS[name]


@settings(max_examples=20)
@given(
    name=st.sampled_from(["bert", "llama", "gpt2"]),
    mode=st.sampled_from(["random", "alpha"]),
    seed=st.integers(0, 2**16),
    alpha=st.floats(0.0, 1.0),
    explicit=st.sampled_from(["per_layer", "shared"]),
)
def test_fold_invariant_hf_models(name, mode, seed, alpha, explicit):
    _check_invariant(_hf_graph(name), mode, seed, alpha, "multiply", explicit)


def _kinds(report) -> dict[str, str]:
    return {layer: g.kind for g in report.groups for layer in g.layers}


def test_llama_folds_into_rmsnorm_weight_and_up_proj_rows():
    _, report = _check_invariant(_hf_graph("llama"), "random", 1, 0.5, "multiply", "per_layer")
    kinds = _kinds(report)
    for i in range(2):
        p = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):  # LlamaRMSNorm: ``weight * h`` -> the weight absorbs 1/s
            assert kinds[p + "self_attn." + proj] == "param_mul"
        assert kinds[p + "mlp.gate_proj"] == kinds[p + "mlp.up_proj"] == "param_mul"
        assert kinds[p + "mlp.down_proj"] == "linear_rows"  # silu(gate) * up: up's output rows absorb 1/s
        assert kinds[p + "self_attn.o_proj"] == "multiply"  # heads merged by a reshape: not traced
    groups = {g.layers: g for g in report.groups}
    assert groups[("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj")].target == (
        "layers.0.input_layernorm"
    )
    assert groups[("layers.0.mlp.down_proj",)].target == "layers.0.mlp.up_proj"


def test_gpt2_conv1d_addmm_folds_into_layernorm():
    _, report = _check_invariant(_hf_graph("gpt2"), "random", 2, 0.5, "multiply", "per_layer")
    kinds = _kinds(report)
    for i in range(2):
        assert kinds[f"h.{i}.attn.c_attn"] == "layer_norm"
        assert kinds[f"h.{i}.mlp.c_fc"] == "layer_norm"
        assert kinds[f"h.{i}.mlp.c_proj"] == "multiply"  # gelu_new between c_fc and c_proj: never folded


def test_bert_post_ln_and_gelu_get_explicit_multiplies_with_reasons():
    g, report = _check_invariant(_hf_graph("bert"), "random", 3, 0.5, "multiply", "per_layer")
    groups = {g.layers[0]: g for g in report.groups}
    qkv = groups["encoder.layer.1.attention.self.query"]
    # Post-LN: the LayerNorm output also feeds the residual add, so folding into it would change that add.
    assert qkv.kind == "multiply" and "add" in qkv.reason and "layer_norm" in qkv.reason
    out = groups["encoder.layer.0.output.dense"]
    assert out.kind == "multiply" and "gelu" in out.reason
    assert not report.exact
    muls = [n for n in g.gm.graph.nodes if n.meta.get(NODE_META) == "explicit smoothing multiply"]
    assert len(muls) == len(report.explicit)  # per_layer: one multiply per linear
    _, shared = _check_invariant(_hf_graph("bert"), "random", 3, 0.5, "multiply", "shared")
    assert len(shared.explicit) < len(report.explicit)  # q/k/v share one multiply


def test_skip_leaves_unfoldable_groups_alone():
    g, report = _check_invariant(_hf_graph("bert"), "random", 4, 0.5, "skip", "per_layer")
    assert report.explicit == [] and len(report.skipped) == len(report.groups)
    assert all("no exact fold" in grp.reason for grp in report.skipped)
    assert not [n for n in g.gm.graph.nodes if n.meta.get(NODE_META)]


def test_idempotent_and_user_parameters_untouched():
    graph = _hf_graph("llama")
    before = {id(t): t.clone() for t in graph.example_inputs if isinstance(t, nn.Parameter)}
    g = graph.clone()
    report = smoothquant_fold(g.gm, _scale_fn("random", 5, 0.5))
    code = g.gm.code
    assert smoothquant_fold(g.gm, _scale_fn("random", 6, 0.5)) is report
    assert g.gm.code == code
    for t in graph.example_inputs:
        if isinstance(t, nn.Parameter):
            assert torch.equal(t, before[id(t)])


# ---- what must never be folded ----------------------------------------------------------------


class _Chains(nn.Module):
    """Producers the pass must not fold into: a shared producer, relu/x*x, a residual, LN without affine."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.d = nn.Linear(16, 16)
        self.e = nn.Linear(16, 16)
        self.f = nn.Linear(16, 16)
        self.g = nn.Linear(16, 16, bias=False)

    def forward(self, x):
        h = self.a(x)
        y1 = self.b(torch.relu(h))  # relu: never folded
        sq = self.c(x)
        y2 = self.d(sq * sq)  # x * x: scaling one operand would scale the product twice
        y3 = self.e(h + x)  # residual
        y4 = self.f(F.layer_norm(y1, (16,)))  # no affine weight: the fold gives it one
        y5 = self.g(h.view(-1, 2, 8).reshape(-1, 16))  # reshapes that keep the last dim: still rows of ``a``
        return y1 + y2 + y3 + y4, y5, h


def test_never_folds_through_nonlinear_or_shared_producers():
    torch.manual_seed(0)
    model = _Chains().double().eval()
    graph = capture_graph(model, torch.randn(3, 16, dtype=torch.float64))
    _, report = _check_invariant(graph, "random", 7, 0.5, "multiply", "per_layer")
    kinds = _kinds(report)
    assert kinds["b"] == "multiply"  # relu
    assert kinds["d"] == "multiply"  # sq * sq
    assert kinds["e"] == "multiply"  # h + x
    assert kinds["f"] == "layer_norm"  # weight-less LayerNorm gets weight 1/s
    assert kinds["g"] == "multiply"  # h also feeds relu, the residual and the output
    reasons = {layer: g.reason for g in report.groups for layer in g.layers}
    assert "relu" in reasons["b"] and "sum" in reasons["e"]


class _PrivateChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 8)
        self.norm = nn.RMSNorm(16)

    def forward(self, x):
        h = self.a(self.norm(x))
        return self.b(F.dropout(h.view(2, -1, 24).contiguous(), 0.1, training=False).to(torch.float64))


def test_folds_through_channelwise_views_into_previous_rows_and_rms_norm():
    torch.manual_seed(0)
    model = _PrivateChain().double().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2.0)
    graph = capture_graph(model, torch.randn(6, 16, dtype=torch.float64))
    g, report = _check_invariant(graph, "random", 8, 0.5, "multiply", "per_layer")
    assert _kinds(report) == {"a": "rms_norm", "b": "linear_rows"}
    assert not [n for n in g.gm.graph.nodes if n.op == "call_function" and n.target is operator.mul]
