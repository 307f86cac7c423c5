"""qbackend.export_mlir: aten decompositions of our ops, torch-mlir lowering, reference execution.

The decomposition tests need no torch-mlir; the lowering tests skip without it (the ``mlir`` extra).
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from torch import nn

import qbackend
from qbackend.export import MLIRExportError, MLIRModule, export_mlir
from qbackend.export.decompositions import decomposition_table
from qbackend.formats import Scheme, quantize


class W8A8Linear(nn.Module):
    """A W8A8 layer calling ``torch.ops.qbackend.w8a8_linear`` (per-token activations, per-channel weights)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        qw = quantize(weight, Scheme("int", 8, granularity="channel"))
        self.register_buffer("codes", qw.codes.reshape(weight.shape))
        self.register_buffer("scale", qw.scale.reshape(-1).float())
        self.bias = bias
        self.n, self.k = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qbackend.w8a8_linear(x, self.codes.reshape(-1), self.scale, self.bias, None, self.n, self.k)


def mixed_mlp() -> nn.Module:
    """nf4 (nested) -> GELU -> W8A8 -> int4: one model covering every decomposition; K=72 straddles blocks."""
    torch.manual_seed(0)
    first = nn.Linear(72, 96)
    last = nn.Linear(48, 24, bias=False)
    m = nn.Sequential(first, nn.GELU(), W8A8Linear(torch.randn(48, 96) / 10, torch.randn(48)), last)
    qbackend.quantize_(m, {"preset": "nf4", "min_params": 0, "include": ["0"]})
    qbackend.quantize_(m, {"preset": "int4", "min_params": 0, "blocksize": 32, "include": ["3"]})
    return m.eval()


def _quantized_weight_sizes(m: nn.Module) -> list[tuple[int, int]]:
    """(packed bytes, weight elements) of each quantized layer."""
    out = []
    for mod in m.modules():
        if isinstance(mod, qbackend.QuantizedLinear):
            out.append((mod.codes.numel(), mod.in_features * mod.out_features))
        elif isinstance(mod, W8A8Linear):
            out.append((mod.codes.numel(), mod.codes.numel()))
    return out


# ---- decompositions (no torch-mlir needed) ------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"preset": "nf4"}, {"preset": "nf4", "nested": False}, {"preset": "fp4"}, {"preset": "int4"},
     {"preset": "int4", "symmetric": True, "blocksize": 64}, {"preset": "int8"}],
)  # fmt: skip
def test_decompositions_compute_what_the_ops_compute(options):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(72, 100), nn.ReLU(), nn.Linear(100, 40, bias=False))
    qbackend.quantize_(m, {**options, "min_params": 0})
    x = torch.randn(2, 3, 72)
    with torch.no_grad():
        program = torch.export.export(m, (x,)).run_decompositions(decomposition_table())
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not [o for o in ops if o.startswith("qbackend.")]
        assert "aten.bitwise_right_shift.Tensor" in ops or options["preset"] == "int8"
        torch.testing.assert_close(program.module()(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_type", ["linalg-on-tensors", "tosa"])  # tosa unpacks nibbles on int32
def test_w8a8_decomposes_to_an_integer_matmul(output_type):
    m = mixed_mlp()
    x = torch.randn(5, 72)
    with torch.no_grad():
        program = torch.export.export(m, (x,)).run_decompositions(decomposition_table(output_type))
        assert any(n.target == torch.ops.aten._int_mm.default for n in program.graph.nodes)
        torch.testing.assert_close(program.module()(x), m(x), rtol=1e-5, atol=1e-5)


def test_missing_extra_gives_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_mlir" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'qbackend\[mlir\]'"):
        export_mlir(mixed_mlp(), torch.randn(2, 72))


def test_constants_are_read_from_every_literal_form():
    text = (
        "%0 = torch.vtensor.literal(dense_resource<torch_tensor_8_torch.uint8> : tensor<8xui8>) : "
        "!torch.vtensor<[8],ui8>\n"
        "%cst = arith.constant dense<[1.0, 2.0]> : tensor<2xf32>\n"
        "%c = stablehlo.constant dense_resource<blob> : tensor<4x6xi8>\n"
        "%s = arith.constant dense<0.5> : tensor<f32>\n"
    )
    got = [(c.shape, c.element_type, c.is_integer) for c in MLIRModule(text, "torch").constants()]
    assert got == [((8,), "ui8", True), ((2,), "f32", False), ((4, 6), "i8", True), ((), "f32", False)]


# ---- lowering with torch-mlir ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_mlir():
    return pytest.importorskip("torch_mlir")


def _assert_integer_weights(module: MLIRModule, model: nn.Module) -> None:
    consts = module.constants()
    for packed, numel in _quantized_weight_sizes(model):
        assert any(c.is_integer and c.numel == packed for c in consts), f"no integer constant of {packed} elements"
        assert not any(not c.is_integer and c.numel == numel for c in consts), f"a float copy of a {numel} weight"


def test_mixed_mlp_lowers_to_linalg_and_runs_like_the_compiled_model(torch_mlir):
    m = mixed_mlp()
    x = torch.randn(5, 72)
    module = export_mlir(m, x)
    assert module.output_type == "linalg-on-tensors"
    module.parse()  # valid MLIR
    _assert_integer_weights(module, m)
    assert re.search(r"linalg\.matmul ins\(.*tensor<5x96xi8>, tensor<96x48xi8>\).*-> tensor<5x48xi32>", module.text)
    assert "arith.shrui" in module.text  # nibbles unpacked by an integer shift

    compiled = torch.compile(m, backend="qbackend", options={"min_params": 0})
    with torch.no_grad():
        expected = compiled(x)
    (got,) = module.execute(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("output_type", ["tosa", "stablehlo"])
def test_mixed_mlp_lowers_to_tosa_and_stablehlo_with_integer_weights(torch_mlir, output_type):
    m = mixed_mlp()
    module = export_mlir(m, torch.randn(5, 72), output_type=output_type)
    module.parse()
    _assert_integer_weights(module, m)
    matmul = {"tosa": r"tosa\.matmul.*xi8>.*-> tensor<[0-9x]+xi32>",
              "stablehlo": r"stablehlo\.dot_general.*xi8>\) -> tensor<5x48xi32>"}[output_type]  # fmt: skip
    assert re.search(matmul, module.text), f"no i8 x i8 -> i32 matmul in the {output_type} module"


def test_bert_layer_lowers_to_linalg_and_matches(torch_mlir):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=1)
    layer = transformers.models.bert.modeling_bert.BertLayer(cfg).eval()
    qbackend.quantize_(layer, {"preset": "nf4", "min_params": 0})
    assert sum(isinstance(mod, qbackend.QuantizedLinear) for mod in layer.modules()) == 6
    x = torch.randn(2, 7, 64)
    module = export_mlir(layer, x)
    module.parse()
    _assert_integer_weights(module, layer)
    with torch.no_grad():
        out = layer(x)
    expected = out[0] if isinstance(out, tuple) else out
    (got,) = module.execute(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_float_model_is_quantized_on_a_copy(torch_mlir):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    module = export_mlir(m, torch.randn(2, 64), output_type="raw", preset="int8", min_params=0)
    assert isinstance(m[0], nn.Linear)  # the user's model is untouched
    assert any(c.element_type == "si8" and c.numel == 64 * 64 for c in module.constants())


def test_a_torch_mlir_crash_becomes_an_error(torch_mlir):
    class Crash(nn.Module):  # torch.div(int8, 16, rounding_mode="floor") segfaults the linalg lowering
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("p", torch.arange(-64, 64, dtype=torch.int8))

        def forward(self, x):
            return x + torch.div(self.p, 16, rounding_mode="floor").float()

    with pytest.raises(MLIRExportError, match=r"torch-mlir crashed \(SIG[A-Z]+\) while lowering to 'linalg-on"):
        export_mlir(Crash(), torch.randn(128))


def test_bad_output_type():
    with pytest.raises(ValueError, match="unknown output_type 'llvm'; valid: linalg-on-tensors, torch, tosa"):
        export_mlir(mixed_mlp(), torch.randn(2, 72), output_type="llvm")


# ---- W8A8 with SmoothQuant ------------------------------------------------------------------------


class SmoothMLP(nn.Module):
    """LayerNorm -> up (SmoothQuant folds into the norm) -> GELU -> down (explicit smoothing multiply)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def _smooth_mlp(**smoothquant) -> tuple[nn.Module, dict, torch.Tensor]:
    torch.manual_seed(0)
    m = SmoothMLP().eval()
    with torch.no_grad():
        m.norm.weight.mul_(1 + 9 * (torch.arange(64) % 13 == 0))  # activation outlier channels
    xs = [torch.randn(5, 64) for _ in range(2)]
    cal = qbackend.calibrate(m, xs, progress=False)
    return m, {"preset": "w8a8", "min_params": 0, "calibration": cal, "smoothquant": smoothquant}, xs[0]


@pytest.mark.parametrize("smoothquant", [{}, {"activation": "tensor", "outlier_threshold": 1.0}])
def test_w8a8_smoothquant_module_decomposes_to_an_integer_matmul_and_a_multiply(smoothquant):
    m, options, x = _smooth_mlp(**smoothquant)
    qbackend.quantize_(m, options)
    assert m.down.smooth is not None and m.up.smooth is None  # the up scales live in the norm
    with torch.no_grad():
        program = torch.export.export(m, (x,)).run_decompositions(decomposition_table())
        ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
        assert ops.count(torch.ops.aten._int_mm.default) == 2
        assert not [o for o in ops if str(o).startswith("qbackend.")]
        torch.testing.assert_close(program.module()(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("smoothquant", [{}, {"outlier_threshold": 1.0}], ids=["token", "token-outliers"])
def test_w8a8_smoothquant_mlp_lowers_to_linalg_and_runs_like_the_compiled_model(torch_mlir, smoothquant):
    m, options, x = _smooth_mlp(**smoothquant)
    module = export_mlir(m, x, **options)  # quantized on a copy, traced on x to fold the scales
    assert isinstance(m.up, nn.Linear)
    module.parse()
    consts = module.constants()
    for n, k in ((128, 64), (48, 128)):
        assert any(c.element_type in ("i8", "si8") and c.numel == n * k for c in consts), f"no int8 {n}x{k} codes"
        assert not any(not c.is_integer and c.numel == n * k for c in consts), f"a float copy of the {n}x{k} weight"
    for n, k in ((128, 64), (48, 128)):
        assert re.search(rf"linalg\.matmul ins\(.*tensor<5x{k}xi8>, tensor<{k}x{n}xi8>\).*-> tensor<5x{n}xi32>",
                         module.text), f"no i8 x i8 -> i32 matmul for the {n}x{k} layer"  # fmt: skip
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="qbackend", options=options)
    with torch.no_grad():
        expected = compiled(x)
    (got,) = module.execute(x)
    # a float op computed another way may flip an int8 activation rounding: a few 1e-3 at most
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)
    assert float((got - expected).abs().mean()) < 1e-4
