"""passes.graph: the one way a pass holds a tensor on a GraphModule and rewrites a linear site."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from qbackend.passes import find_linears
from qbackend.passes.graph import attach_tensor, attr_name, become
from qbackend.testing import capture_graph


def _gm() -> fx.GraphModule:
    return fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_attach_tensor_names_uniquely_and_reuses_the_same_tensor():
    gm = _gm()
    a, b = torch.ones(3), torch.zeros(3)
    n1 = attach_tensor(gm, "_qbackend_x", a)
    n2 = attach_tensor(gm, "_qbackend_x", b)  # another tensor: a fresh name
    n3 = attach_tensor(gm, "_qbackend_x", a)  # the same tensor: the same attribute, a new read
    assert (n1.target, n2.target, n3.target) == ("_qbackend_x", "_qbackend_x_1", "_qbackend_x")
    assert gm._qbackend_x is a and gm._qbackend_x_1 is b
    assert all(n.op == "get_attr" for n in (n1, n2, n3))
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    assert first.op == "get_attr"  # placed before the first computation


def test_attach_tensor_keeps_parameters_and_maps_dynamo_sources():
    gm = _gm()
    gm._param_name_to_source = {}
    p = nn.Parameter(torch.ones(2))
    node = attach_tensor(gm, "ratio", p)
    assert gm.get_parameter(node.target) is p and "ratio" in gm._param_name_to_source


def test_attr_name_sanitises():
    assert attr_name("encoder.layer.0.q", "codes") == "encoder_layer_0_q_codes"


def test_become_rewrites_a_site_in_place():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(2, 8)
    g = capture_graph(model, x)
    sites = find_linears(g.gm)
    assert len(sites) == 2
    for site in sites:
        node = site.node
        become(g.gm.graph, site, torch.nn.functional.linear, (site.x, site.weight, site.bias))
        assert site.node is node and node.target is torch.nn.functional.linear
        assert "qbackend_layer" in node.meta
    g.gm.graph.lint()
    g.gm.recompile()
    with torch.no_grad():
        torch.testing.assert_close(g.run()[0], model(x))
