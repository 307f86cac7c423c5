"""The workflow registry: a toy workflow registered from this file alone drives torch.compile, quantize_
and explain through the core (no edit to the core), and the built-in workflows are found by name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qbackend
from qbackend.core import registry
from qbackend.core.registry import Workflow, WorkflowError, register_workflow
from qbackend.passes import LoweringResult, find_linears
from qbackend.passes.graph import become
from qbackend.passes.modules import linear_modules
from qbackend.passes.report import Report, float_row


@dataclass(frozen=True)
class ToyConfig:
    """The toy workflow's own config: every linear's output is multiplied by ``factor``."""

    factor: float = 2.0


def toy_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, factor: float) -> torch.Tensor:
    return F.linear(x, w, b) * factor


class ToyLinear(nn.Module):
    def __init__(self, lin: nn.Linear, factor: float) -> None:
        super().__init__()
        self.weight, self.bias, self.factor = lin.weight, lin.bias, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return toy_linear(x, self.weight, self.bias, self.factor)


CALLS: list[str] = []


def compile_toy(gm: torch.fx.GraphModule, config: ToyConfig, measure_error: bool) -> LoweringResult:
    CALLS.append("compile")
    result = LoweringResult(Report(graphs=1))
    for site in find_linears(gm):
        become(gm.graph, site, toy_linear, (site.x, site.weight, site.bias, config.factor))
        result.nodes += 1
        result.report.layers.append(float_row(site.layer_name, site.param.fqn, site.param.tensor,
                                              transposed=site.transposed, forms=(site.form,)))  # fmt: skip
    gm.graph.lint()
    gm.recompile()
    return result


def quantize_toy(model: nn.Module, config: ToyConfig, example_inputs: object) -> Report:
    CALLS.append("quantize")
    report = Report(graphs=0)
    for name, parent, child, mod in list(linear_modules(model)):
        setattr(parent, child, ToyLinear(mod, config.factor))
        report.layers.append(float_row(name, f"{name}.weight", mod.weight, transposed=False, forms=("linear",)))
    return report


def guard_toy(result: LoweringResult, compiled):
    def run(*args):
        CALLS.append("guard")
        return compiled(*args)

    return run


@pytest.fixture
def toy():
    CALLS.clear()
    wf = register_workflow(Workflow("toy", compile=compile_toy, quantize=quantize_toy, config_type=ToyConfig,
                                    guard=guard_toy))  # fmt: skip
    torch._dynamo.reset()
    yield wf
    registry.unregister_workflow("toy")
    torch._dynamo.reset()


def _model() -> nn.Module:
    torch.manual_seed(0)
    # no biases: scaling every linear by f scales the output by f * f (ReLU commutes with f > 0)
    return nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False))


def test_toy_workflow_compiles_through_qbackend(toy):
    model, x = _model(), torch.randn(4, 16)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="qbackend", options=ToyConfig(factor=3.0))(x)
    torch.testing.assert_close(out, ref * 9.0, rtol=1e-5, atol=1e-5)
    assert CALLS[0] == "compile" and "guard" in CALLS


def test_toy_workflow_module_path_and_explain(toy):
    model, x = _model(), torch.randn(4, 16)
    with torch.no_grad():
        ref = model(x)
    report = qbackend.explain(model, x, config=ToyConfig(factor=2.0))
    assert [r.name for r in report.layers] == ["0", "2"] and CALLS == ["compile"]
    report = qbackend.quantize_(model, ToyConfig(factor=2.0))
    assert isinstance(model[0], ToyLinear) and len(report.layers) == 2 and CALLS[-1] == "quantize"
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref * 4.0, rtol=1e-5, atol=1e-5)


def test_duplicate_name_and_unknown_workflow(toy):
    with pytest.raises(WorkflowError, match="registered already"):
        register_workflow(Workflow("toy", compile=compile_toy))
    with pytest.raises(WorkflowError, match="no workflow named 'nope'"):
        registry.get_workflow("nope")


def test_builtin_workflows_by_config():
    assert registry.workflow_for(qbackend.QuantConfig()).name == "weight_only"
    assert registry.workflow_for(qbackend.QuantConfig.preset("w8a8")).name == "w8a8"
    assert registry.workflow_for(qbackend.QuantConfig(qat=True)).name == "qat"
    assert {"weight_only", "w8a8", "qat"} <= {wf.name for wf in registry.workflows()}
    assert {qbackend.QuantizedLinear, qbackend.W8A8Linear} <= set(registry.module_types())


def test_workflow_without_module_form(toy):
    register_workflow(Workflow("toy", compile=compile_toy, config_type=ToyConfig), replace=True)
    with pytest.raises(WorkflowError, match="no module form"):
        qbackend.quantize_(_model(), ToyConfig())


def test_core_imports_no_workflow():
    """The core finds workflows by module name only: no static import of qbackend.workflows in it."""
    import ast
    from pathlib import Path

    core = Path(qbackend.__file__).parent / "core"
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
                assert "workflows" not in name, f"{path.name} imports {name}"
            elif isinstance(node, ast.Import):
                assert not any("workflows" in a.name for a in node.names), path.name
