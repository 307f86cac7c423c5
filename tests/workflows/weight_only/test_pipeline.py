"""The pass pipeline on Dynamo graphs (no Inductor): find, select, lower, and their invariants."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from qbackend import QuantConfig
from qbackend.core.backend import run_passes
from qbackend.formats import FormatError
from qbackend.passes import LAYER_META, find_linears
from qbackend.passes.weight_cache import get_entry
from qbackend.testing import (
    FORMS,
    GeneratedModel,
    LayerSpec,
    ModelSpec,
    capture_graph,
    capture_graphs,
    check_rewrite,
    linear_models,
    quant_configs,
    quantized_op_nodes,
)

ALL = QuantConfig(min_params=0)


def passes(config: QuantConfig = ALL):
    return lambda gm: run_passes(gm, config, measure_error=True)


def one_layer(form: str, bias: bool, batch=(2, 3), k=72, n=40) -> GeneratedModel:
    bias = True if form in ("addmm", "conv1d") else bias
    return GeneratedModel(ModelSpec((LayerSpec(form, k, n, bias, activation="none"),), batch, seed=1)).eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_is_found_and_lowered_exactly(form, bias):
    m = one_layer(form, bias)
    g = capture_graph(m, m.make_input())
    (site,) = find_linears(g.gm)
    assert site.transposed == FORMS[form]
    assert (site.bias is not None) == (bias or form in ("addmm", "conv1d"))
    assert (site.in_features, site.out_features) == (72, 40)
    if bias and form in ("matmul_t", "kn_param", "mm_permute", "method_matmul"):
        assert site.form.endswith("+bias")  # the `+ b` after the product became the op's bias
    check = check_rewrite(g, passes())
    assert check.error_vs_dequantized is not None and check.error_vs_dequantized < 1e-5
    (row,) = check.result.report.layers
    assert row.quantized and row.format == "nf4-b64-nested" and row.rel_error < 0.15


@settings(max_examples=15)
@given(case=linear_models(outliers=False), config=quant_configs())
def test_property_rewrite_invariants_well_conditioned(case, config):
    """Lints, exact vs dequantized weights, within 3x the summed weight error of float, reports = ops, idempotent."""
    g = capture_graph(case.model, *case.inputs)
    check = check_rewrite(g, passes(config))
    assert check.error_vs_dequantized is not None
    distinct = {ls.tie_to if ls.tie_to is not None else i for i, ls in enumerate(case.spec.layers)}
    assert len(check.result.report.quantized) == len(distinct)  # tied weights: one layer


@settings(max_examples=10)
@given(case=linear_models(), config=quant_configs())
def test_property_outlier_channels_still_exact_vs_dequantized(case, config):
    """With outlier channels the float error can exceed the weight error (what SmoothQuant fixes), but
    the lowering must still compute exactly the dequantized-weight model; 1.0 flags garbage."""
    g = capture_graph(case.model, *case.inputs)
    check = check_rewrite(g, passes(config), bound=1.0)
    assert check.error_vs_dequantized is not None


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight  # tied: one parameter, two layers
        self.c = nn.Linear(64, 64)

    def forward(self, x):
        x = self.a(x)
        x = x @ self.a.weight.t()  # and a third use in another form
        return self.c(self.b(x))


def test_tied_weights_quantized_once_and_shared():
    m = Tied().eval()
    g = capture_graph(m, torch.randn(3, 64))
    result = run_passes(g.gm, ALL)
    rows = {r.name: r for r in result.report.layers}
    assert set(rows) == {"a", "c"} and rows["a"].sites == 3
    ops = quantized_op_nodes(g.gm)
    assert len(ops) == 4
    tensors_of_a = {tuple(a.target for a in op.args[1:8] if isinstance(a, torch.fx.Node)) for op in ops[:3]}
    assert len(tensors_of_a) == 1  # the three uses read the same buffers
    assert len(result.lowered) == 2


def test_quantized_once_across_graphs_and_compiles():
    """Graph-break subgraphs and later compiles share one quantized copy of a weight."""
    lin = nn.Linear(64, 64)

    def f(x):
        y = lin(x)
        torch._dynamo.graph_break()
        return lin(y)

    graphs = capture_graphs(f, torch.randn(2, 64))
    assert len(graphs) == 2
    r1, r2 = (run_passes(g.gm, ALL) for g in graphs)
    assert r1.lowered[0].entry is r2.lowered[0].entry
    assert get_entry(lin.weight, ALL.scheme, False, "x") is r1.lowered[0].entry


def test_excluded_small_and_unlowerable_layers_are_reported_not_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(128, 128)
            self.head = nn.Linear(128, 128)
            self.tiny = nn.Linear(128, 4)
            self.w = nn.Parameter(torch.randn(128, 128))

        def forward(self, x):
            x = self.tiny(self.head(self.big(x)))
            y = torch.addmm(torch.zeros(2, 128), torch.randn(2, 128), self.w.t(), beta=0.5)
            return x, y

    g = capture_graph(M().eval(), torch.randn(2, 128))
    report = run_passes(g.gm, QuantConfig(exclude=["head"], min_params=1000)).report
    why = {r.name: (r.quantized, r.reason) for r in report.layers}
    assert why["big"] == (True, "")
    assert why["head"] == (False, "excluded by 'head'")
    assert why["tiny"] == (False, "too small: 512 params < min_params=1000")
    assert why["w"][0] is False and "beta/alpha" in why["w"][1]
    assert len(quantized_op_nodes(g.gm)) == 1
    assert "kept float: 1 excluded by 'head', 1 too small, 1 not lowerable" in report.summary()
    text = str(report)
    assert "excluded by 'head'" in text and "nf4-b64-nested" in text


def test_autocast_region_stays_float_with_reason():
    lin = nn.Linear(64, 64)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lin(x)

    g = capture_graph(f, torch.randn(2, 64))
    (row,) = run_passes(g.gm, ALL).report.layers
    assert not row.quantized and "autocast" in row.reason


def test_activation_matmuls_are_not_layers():
    lin = nn.Linear(32, 32)

    def attn(q, k):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ lin(k)

    g = capture_graph(attn, torch.randn(2, 5, 32), torch.randn(2, 5, 32))
    assert [s.layer_name for s in find_linears(g.gm)] == ["lin"]


def test_unrecognized_matmul_forms_are_reported_float():
    w = nn.Parameter(torch.randn(48, 64))

    def f(x):
        return torch.einsum("bk,nk->bn", x, w)

    g = capture_graph(f, torch.randn(3, 64))
    (row,) = run_passes(g.gm, ALL).report.layers
    assert (row.name, row.quantized) == ("w", False)
    assert row.reason == "not lowerable: used by einsum (not recognized as a linear layer)"


def test_nan_weight_names_the_layer():
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        m[1].weight[3, 5] = float("nan")
    g = capture_graph(m, torch.randn(2, 64))
    with pytest.raises(FormatError, match=r"^1: contains 1 NaN/Inf"):
        run_passes(g.gm, ALL)


def test_names_and_op_annotations():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32)))
    g = capture_graph(m, torch.randn(2, 64))
    result = run_passes(g.gm, ALL)
    assert [r.name for r in result.report.layers] == ["0", "2.0"]
    assert [n.meta[LAYER_META] for n in quantized_op_nodes(g.gm)] == [("0.weight", False), ("2.0.weight", False)]


def test_bf16_model_lowered():
    m = one_layer("linear_module", True).to(torch.bfloat16)
    g = capture_graph(m, m.make_input().bfloat16())
    check = check_rewrite(g, passes(), dequant_rtol=1e-2)
    assert check.result.report.layers[0].quantized
    assert g.run()[0].dtype == torch.bfloat16


def test_1d_input_matmul():
    w = nn.Parameter(torch.randn(48, 64))
    g = capture_graph(lambda x: x @ w.t(), torch.randn(64))
    check = check_rewrite(g, passes())
    assert check.result.report.layers[0].quantized


def test_functional_linear_reads_param_from_kwargs():
    lin = nn.Linear(64, 16)
    g = capture_graph(lambda x: F.linear(input=x, weight=lin.weight, bias=lin.bias), torch.randn(3, 64))
    check = check_rewrite(g, passes())
    assert check.result.report.layers[0].quantized


def test_compute_option_is_the_op_argument_and_in_the_report(cpu_compute):
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40))
    x = torch.randn(3, 64)
    outs = {}
    for option, fast, want in [("int8", (), "int8"), ("auto", (), "fp32"), ("auto", [("bf16", "nf4")], "bf16"),
                               ("fp32", [("bf16", "nf4")], "fp32")]:  # fmt: skip
        cpu_compute(fast=fast)
        g = capture_graph(m, x)
        result = run_passes(g.gm, QuantConfig(min_params=0, compute=option))
        assert [n.args[-1] for n in quantized_op_nodes(g.gm)] == [want, want], option
        assert [r.compute for r in result.report.layers] == [want, want]
        assert f"compute {want} x2" in result.report.summary()
        with torch.no_grad():
            outs[want] = g.run()[0]
    # the same model, only the arithmetic differs: int8 really ran, and stays close to exact
    assert (outs["int8"] - outs["fp32"]).abs().max() > 0
    assert torch.allclose(outs["int8"], outs["fp32"], rtol=0, atol=0.05 * float(outs["fp32"].abs().max()))


def test_explicit_compute_the_cpu_lacks_fails_the_compile(cpu_compute):
    from qbackend.kernels.compute_policy import ComputeUnavailable

    cpu_compute(features=("avx2",))
    g = capture_graph(nn.Linear(64, 64), torch.randn(2, 64))
    with pytest.raises(ComputeUnavailable, match="compute='bf16' needs AVX512-BF16"):
        run_passes(g.gm, QuantConfig(min_params=0, compute="bf16"))
