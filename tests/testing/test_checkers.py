"""qbackend.testing: the checkers catch broken rewrites, the strategies cover every form, capture works."""

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from qbackend import QuantConfig
from qbackend.core.backend import run_passes
from qbackend.passes import find_linears
from qbackend.testing import (
    FORMS,
    RewriteCheckError,
    assert_close_to_float,
    assert_idempotent,
    assert_lints,
    assert_lowers_reported,
    capture_graph,
    capture_graphs,
    check_rewrite,
    model_specs,
    quantized_op_nodes,
)

CFG = QuantConfig(min_params=0)


def good_pass(gm):
    return run_passes(gm, CFG, measure_error=True)


@pytest.fixture
def graph():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    return capture_graph(m, torch.randn(3, 64))


def test_good_pass_passes_every_check(graph):
    check = check_rewrite(graph, good_pass)
    assert check.error_vs_float <= check.bound
    assert check.error_vs_dequantized < 1e-5


def test_wrong_numerics_are_caught(graph):
    def swaps_weights(gm):  # quantizes, then feeds the second layer's weights a scaled input: wrong values
        result = good_pass(gm)
        op = quantized_op_nodes(gm)[1]
        with gm.graph.inserting_before(op):
            op.args = (gm.graph.call_function(torch.mul, (op.args[0], 1.5)), *op.args[1:])
        gm.recompile()
        return result

    with pytest.raises(RewriteCheckError, match="differs from the float graph|differs from float-with-dequantized"):
        check_rewrite(graph, swaps_weights, bound=1.0)
    with pytest.raises(RewriteCheckError, match="outputs differ from the float graph by .* bound 0.1"):
        check_rewrite(graph, swaps_weights, bound=0.1)


def test_report_mismatch_is_caught(graph):
    def under_reports(gm):
        result = good_pass(gm)
        result.report.layers[1].quantized = False
        return result

    with pytest.raises(RewriteCheckError, match="lowered layers .* != reported quantized layers"):
        check_rewrite(graph, under_reports)

    g = graph.clone()
    report = run_passes(g.gm, CFG.replace(exclude=["2"])).report
    report.layers[1].reason = "claims float"
    assert_lowers_reported(g.gm, report)  # consistent: layer 2 really is still float
    report.layers[1].forms = ("linear", "linear")  # claims two float uses; the graph has one
    with pytest.raises(RewriteCheckError, match="reported float"):
        assert_lowers_reported(g.gm, report)


def test_non_idempotent_pass_is_caught(graph):
    g = graph.clone()
    good_pass(g.gm)
    assert_idempotent(g.gm, good_pass)

    def adds_a_node(gm):
        out = next(iter(gm.graph.find_nodes(op="output")))
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.relu, (out.args[0][0],))
        gm.recompile()
        return good_pass(gm)

    with pytest.raises(RewriteCheckError, match="not idempotent"):
        assert_idempotent(g.gm, adds_a_node)


def test_broken_graph_does_not_lint(graph):
    g = graph.clone()
    good_pass(g.gm)
    assert_lints(g.gm)
    first_attr = next(iter(g.gm.graph.find_nodes(op="get_attr")))
    delattr(g.gm, first_attr.target)  # a buffer the graph reads is gone
    with pytest.raises(RewriteCheckError, match="does not lint"):
        assert_lints(g.gm)
    g2 = graph.clone()
    good_pass(g2.gm)
    op = quantized_op_nodes(g2.gm)[0]
    op.prepend(next(iter(g2.gm.graph.find_nodes(op="output"))).args[0][0])  # use before definition
    with pytest.raises(RewriteCheckError, match="does not lint"):
        assert_lints(g2.gm)


def test_close_to_float_bound():
    ref = [torch.ones(4)]
    assert assert_close_to_float(ref, [torch.ones(4) * 1.01], 0.02) == pytest.approx(0.01)
    with pytest.raises(RewriteCheckError):
        assert_close_to_float(ref, [torch.ones(4) * 1.1], 0.02)
    with pytest.raises(RewriteCheckError, match="expected"):
        assert_close_to_float(ref, [torch.ones(5)], 0.02)


def test_capture_graphs_with_graph_break_and_clone_is_independent():
    lin = nn.Linear(16, 16)

    def f(x):
        x = lin(x)
        print("graph break")
        return lin(x).relu()

    graphs = capture_graphs(f, torch.randn(2, 16))
    assert len(graphs) == 2
    with pytest.raises(ValueError, match="expected one Dynamo graph, got 2"):
        capture_graph(f, torch.randn(2, 16))
    c = graphs[0].clone()
    good_pass(c.gm)
    assert quantized_op_nodes(c.gm) and not quantized_op_nodes(graphs[0].gm)
    assert graphs[0].run()[0].shape == c.run()[0].shape == (2, 16)


@settings(max_examples=15)
@given(spec=model_specs(max_layers=3))
def test_strategy_models_trace_and_every_layer_is_found(spec):
    from qbackend.testing import GeneratedModel

    m = GeneratedModel(spec)
    g = capture_graph(m, m.make_input())
    sites = find_linears(g.gm)
    assert len(sites) == len(spec.layers)
    assert [s.transposed for s in sites] == [FORMS[ls.form] for ls in spec.layers]
    assert all(s.skip_reason is None for s in sites)


def test_strategies_cover_all_forms():
    from hypothesis import Phase

    seen: set[str] = set()

    @settings(max_examples=300, phases=[Phase.generate], database=None)
    @given(spec=model_specs())
    def collect(spec):
        seen.update(ls.form for ls in spec.layers)
        if any(ls.tie_to is not None for ls in spec.layers):
            seen.add("tied")
        if any(ls.outlier_cols for ls in spec.layers) and spec.input_outliers:
            seen.add("outliers")
        if len(spec.batch_shape) == 3:
            seen.add("4-D input")
        if any(ls.in_features % 32 for ls in spec.layers):
            seen.add("width not a multiple of 32")

    collect()
    assert seen == {*FORMS, "tied", "outliers", "4-D input", "width not a multiple of 32"}
