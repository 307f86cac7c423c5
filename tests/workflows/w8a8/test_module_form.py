"""W8A8 / SmoothQuant in module form: quantize_, save -> load, equality with the compiled model, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import qbackend
import qbackend.formats.qweight
from qbackend.core.backend import run_passes
from qbackend.core.config import QuantConfig
from qbackend.serialization import load, save
from qbackend.testing import capture_graph
from qbackend.workflows.w8a8.linear import W8A8Linear
from qbackend.workflows.w8a8.module_form import W8A8ModuleError


class MLP(nn.Module):
    """A LayerNorm feeding ``up`` (exact fold), GELU before ``mid`` (explicit multiply), ``mid`` feeding ``down``
    directly (fold into mid's output rows), and a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 128)
        self.mid = nn.Linear(128, 96)
        self.down = nn.Linear(96, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.mid(F.gelu(self.up(self.norm(x)))))


def _mlp_and_data() -> tuple[MLP, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = MLP().eval()
    with torch.no_grad():  # a few activation outlier channels after the norm, as in real transformers
        m.norm.weight.mul_(1 + 9 * (torch.arange(64) % 13 == 0))
    g = torch.Generator().manual_seed(1)
    return m, [torch.randn(2, 5 + i, 64, generator=g) for i in range(3)]


W8A8 = {"preset": "w8a8", "min_params": 0}
VARIANTS = {
    "token": {},
    "tensor": {"activation": "tensor"},
    "token-outliers": {"outlier_threshold": 1.0},  # after smoothing |x| <= ~1.5: some columns reach it
    "tensor-outliers": {"activation": "tensor", "outlier_threshold": 1.0},
}


def _backend(model: nn.Module, options: dict, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(compiled model's output, the backend's rewritten graph run eagerly)``. The module form must equal
    the second exactly; the first differs by Inductor's float rounding (a fused GELU/LayerNorm can flip
    an int8 activation rounding)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qbackend", options=options)
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    out = getattr(out, "last_hidden_state", out)
    graph = capture_graph(model, *args, **kwargs)
    run_passes(graph.gm, QuantConfig.from_options(options))
    return out, next(o for o in graph.run() if o.shape == out.shape)  # (HF models also return caches)


INDUCTOR_ATOL = 1e-2  # a few int8 activation roundings flipped by Inductor's float rounding


def _checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as st:
        return {k: st.get_tensor(k) for k in st.keys()}, json.loads(st.metadata()["qbackend"])  # noqa: SIM118


def _assert_no_float_weights(tensors: dict[str, torch.Tensor], layers: dict) -> None:
    for name, rec in layers.items():
        n, k = rec["out_features"], rec["in_features"]
        assert tensors[f"{name}.codes"].dtype == torch.int8 and tensors[f"{name}.codes"].numel() == n * k
        assert f"{name}.weight" not in tensors
    floats = [k for k, t in tensors.items() if t.is_floating_point() and t.dim() >= 2]
    assert floats == [], f"float matrices in the checkpoint: {floats}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mlp_save_load_equals_compiled(tmp_path, variant, no_quantize):
    model, xs = _mlp_and_data()
    cal = qbackend.calibrate(model, xs, progress=False)
    sq = VARIANTS[variant]
    options = {**W8A8, "calibration": cal, "smoothquant": sq}
    x = xs[1]
    compiled, eager = _backend(model, options, x)
    norm_before = model.norm.weight.detach().clone()

    path = save(model, tmp_path / "mlp.safetensors", **options)
    assert isinstance(model.up, nn.Linear) and torch.equal(model.norm.weight, norm_before)  # user's model untouched
    no_quantize()
    loaded = load(path, MLP)  # a meta skeleton: no float weight is ever allocated
    assert all(isinstance(getattr(loaded, n), W8A8Linear) for n in ("up", "mid", "down"))
    with torch.no_grad():
        got = loaded(x)
        reference = model(x)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    torch.testing.assert_close(got, compiled, rtol=0, atol=INDUCTOR_ATOL)
    assert (got - reference).norm() / reference.norm() < 0.05  # and a usable W8A8 model

    tensors, manifest = _checkpoint(path)
    layers = manifest["layers"]
    _assert_no_float_weights(tensors, layers)
    # The fold into the LayerNorm is a fold (new norm parameters), the one after GELU an explicit multiply.
    assert not torch.equal(tensors["norm.weight"], norm_before) and "up.smooth" not in tensors
    assert "mid.smooth" in tensors and tensors["mid.smooth"].shape == (128,)
    assert "down.smooth" not in tensors and "into mid (linear_rows)" in layers["down"]["options"]["smoothing"]
    fmt = f"w8a8-{sq.get('activation', 'token')}" + ("-outliers1" if "outlier_threshold" in sq else "")
    assert {rec["format"] for rec in layers.values()} == {fmt}
    assert ("up.act_scale" in tensors) == (sq.get("activation") == "tensor")
    assert manifest["config"]["smoothquant"]["activation"] == sq.get("activation", "token")
    assert manifest["config"]["calibration"]["fingerprint"] == cal.fingerprint()
    assert all(rec["kind"] == "w8a8" and rec["weight"]["scheme"]["granularity"] == "channel" for rec in layers.values())


def test_outlier_threshold_is_active_and_kept():
    model, xs = _mlp_and_data()
    cal = qbackend.calibrate(model, xs, progress=False)
    outs = {}
    for name in ("token", "token-outliers"):
        m = qbackend.serialization.source.shallow_copy_tree(model)
        qbackend.quantize_(m, {**W8A8, "calibration": cal, "smoothquant": VARIANTS[name]})
        with torch.no_grad():
            outs[name] = m(xs[0])
    assert m.up.op == torch.ops.qbackend.w8a8_outlier_linear.default and m.up.threshold == 1.0
    assert not torch.allclose(outs["token"], outs["token-outliers"])  # some columns did reach the threshold


def test_in_memory_module_form_equals_the_loaded_one_and_frees_float_weights(tmp_path):
    model, xs = _mlp_and_data()
    cal = qbackend.calibrate(model, xs, progress=False)
    options = {**W8A8, "calibration": cal, "smoothquant": {"search_alpha": True, "alpha_grid": (0.3, 0.5, 0.8)}}
    compiled, eager = _backend(model, options, xs[0])
    report = qbackend.quantize_(model, options)  # in place, as for the weight-only presets
    assert len(report.quantized) == 3 and {r.format for r in report.quantized} == {"w8a8-token"}
    assert not [n for n, p in model.named_parameters() if p.dim() == 2]  # no float weight left
    with torch.no_grad():
        before = model(xs[0])
    torch.testing.assert_close(before, eager, rtol=0, atol=0)
    torch.testing.assert_close(before, compiled, rtol=0, atol=INDUCTOR_ATOL)
    path = save(model, tmp_path / "m.safetensors")  # already quantized: saved as it is
    loaded = load(path, MLP)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xs[0]), before, rtol=0, atol=0)
    assert "searched" in loaded.up.smoothing


def test_compiled_model_saves_with_its_w8a8_options(tmp_path):
    model, xs = _mlp_and_data()
    cal = qbackend.calibrate(model, xs, progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qbackend", options={**W8A8, "calibration": cal})
    with torch.no_grad():
        expected = compiled(xs[2])
    path = save(compiled, tmp_path / "m.safetensors")  # the calibration's first batch is the trace input
    with torch.no_grad():
        torch.testing.assert_close(load(path, MLP)(xs[2]), expected, rtol=0, atol=INDUCTOR_ATOL)


def test_a_float_layer_keeps_the_fold_it_absorbed():
    model, xs = _mlp_and_data()
    cal = qbackend.calibrate(model, xs, progress=False)
    options = {**W8A8, "calibration": cal, "exclude": ["mid"]}  # mid stays float; down's 1/s goes into its rows
    _, eager = _backend(model, options, xs[0])
    m = qbackend.serialization.source.shallow_copy_tree(model)
    qbackend.quantize_(m, options)
    assert isinstance(m.mid, nn.Linear) and isinstance(m.down, W8A8Linear) and m.down.smooth is None
    assert not torch.equal(m.mid.weight, model.mid.weight) and not torch.equal(m.mid.bias, model.mid.bias)
    with torch.no_grad():
        torch.testing.assert_close(m(xs[0]), eager, rtol=0, atol=0)


def test_calibration_file_keeps_the_example_batch(tmp_path):
    model, xs = _mlp_and_data()
    cal = qbackend.calibrate(model, xs, progress=False)
    cal.save(tmp_path / "cal")
    again = qbackend.CalibrationResult.load(tmp_path / "cal")
    assert torch.equal(again.example, xs[0])
    ids = torch.arange(6).reshape(2, 3)
    for example in ({"input_ids": ids, "return_dict": False}, (ids, None)):
        qbackend.CalibrationResult(cal.layers, 1, example=example).save(tmp_path / "other")
        got = qbackend.CalibrationResult.load(tmp_path / "other").example
        assert type(got) is type(example) and all(
            torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(got.values() if isinstance(got, dict) else got,
                            example.values() if isinstance(example, dict) else example, strict=True)
        )  # fmt: skip
    path = save(model, tmp_path / "m.safetensors", **W8A8, calibration=tmp_path / "cal.json")
    _, eager = _backend(model, {**W8A8, "calibration": cal}, xs[0])
    with torch.no_grad():
        torch.testing.assert_close(load(path, MLP)(xs[0]), eager, rtol=0, atol=0)


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "bert":
        cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=100, max_position_embeddings=16)  # fmt: skip
        return transformers.BertModel(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=16)  # fmt: skip
    return transformers.LlamaModel(cfg).eval()


@pytest.mark.parametrize(
    "name, sq", [("bert", {}), ("bert", {"activation": "tensor", "outlier_threshold": 1.0}), ("llama", {})]
)
def test_transformers_save_load_equals_compiled(tmp_path, name, sq, no_quantize):
    model = _hf(name)
    batches = [{"input_ids": torch.randint(0, 100, (2, n))} for n in (5, 7, 6)]
    cal = qbackend.calibrate(model, batches, progress=False)
    options = {**W8A8, "calibration": cal, "smoothquant": sq}
    ids = batches[1]["input_ids"]
    compiled, eager = _backend(model, options, input_ids=ids)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n.lower()}
    path = save(model, tmp_path / f"{name}.safetensors", **options)
    no_quantize()
    loaded = load(path)  # rebuilt from the stored transformers config
    with torch.no_grad():
        got = loaded(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    torch.testing.assert_close(got, compiled, rtol=0, atol=INDUCTOR_ATOL)
    tensors, manifest = _checkpoint(path)
    layers = manifest["layers"]
    _assert_no_float_weights({k: t for k, t in tensors.items() if "embed" not in k}, layers)
    if name == "bert":  # post-LN residuals and GELU: no exact fold, an explicit multiply per linear
        assert len(layers) == 13 and all("smooth" in rec["tensors"] for rec in layers.values())
        assert all(torch.equal(tensors[n], v) for n, v in norms.items())
    else:  # RMSNorm weights absorb 1/s of q/k/v and gate/up; up_proj's rows that of down_proj; o_proj multiplies
        assert len(layers) == 14 and sorted(n for n, r in layers.items() if "smooth" in r["tensors"]) == [
            "layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"]  # fmt: skip
        assert all(not torch.equal(tensors[n], v) for n, v in norms.items() if not n.startswith("norm."))
        assert "into layers.0.mlp.up_proj (linear_rows)" in layers["layers.0.mlp.down_proj"]["options"]["smoothing"]


# ---- errors and fallbacks -----------------------------------------------------------------------


def test_smoothing_without_an_example_batch_says_what_to_pass(tmp_path):
    model, xs = _mlp_and_data()
    cal = qbackend.calibrate(model, xs, progress=False)
    cal.example = None  # e.g. a calibration file saved by an older qbackend
    with pytest.raises(W8A8ModuleError, match=r"holds no example batch .* pass example_inputs=<one batch>"):
        save(model, tmp_path / "m.safetensors", **W8A8, calibration=cal)
    path = save(model, tmp_path / "m.safetensors", **W8A8, calibration=cal, example_inputs=xs[0])
    assert isinstance(load(path, MLP).mid, W8A8Linear)


def test_w8a8_without_calibration_warns_and_is_naive_like_the_compiled_model(tmp_path):
    model, xs = _mlp_and_data()
    with pytest.warns(UserWarning, match="W8A8 without a calibration: naive W8A8, no SmoothQuant scales"):
        path = save(model, tmp_path / "m.safetensors", **W8A8)
    loaded = load(path, MLP)
    assert loaded.mid.smooth is None and torch.equal(loaded.norm.weight, model.norm.weight)
    compiled, eager = _backend(model, W8A8, xs[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(xs[0]), eager, rtol=0, atol=0)
        torch.testing.assert_close(loaded(xs[0]), compiled, rtol=0, atol=INDUCTOR_ATOL)


def test_a_model_that_does_not_trace_in_one_graph_gives_a_clear_error(tmp_path):
    class Breaks(MLP):
        def forward(self, x):
            h = self.up(self.norm(x))
            torch._dynamo.graph_break()
            return self.down(self.mid(F.gelu(h)))

    model, xs = _mlp_and_data()
    broken = Breaks().eval()
    broken.load_state_dict(model.state_dict())
    cal = qbackend.calibrate(broken, xs, progress=False)
    with pytest.raises(W8A8ModuleError, match=r"traces the model once .* that failed: .* must trace as one graph"):
        save(broken, tmp_path / "m.safetensors", **W8A8, calibration=cal)


def test_a_norm_shared_by_two_groups_falls_back_to_an_explicit_multiply():
    class Shared(nn.Module):  # one LayerNorm module applied twice: its weight cannot hold two folds
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.a(self.norm(x)) + self.b(self.norm(2 * x))

    torch.manual_seed(0)
    model = Shared().eval()
    xs = [torch.randn(3, 64) * (1 + 9 * (torch.arange(64) % 11 == 0)) for _ in range(2)]
    cal = qbackend.calibrate(model, xs, progress=False)
    options = {**W8A8, "calibration": cal}
    compiled, eager = _backend(model, options, xs[0])
    m = qbackend.serialization.source.shallow_copy_tree(model)
    qbackend.quantize_(m, options)
    assert m.a.smooth is not None and m.b.smooth is not None and "cannot be held by the module" in m.a.smoothing
    assert torch.equal(m.norm.weight, model.norm.weight)  # left unfolded
    with torch.no_grad():
        # an explicit multiply instead of a fold: equal up to float rounding, not bit for bit
        torch.testing.assert_close(m(xs[0]), eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(xs[0]), compiled, rtol=0, atol=INDUCTOR_ATOL)


def test_half_keeps_the_int8_codes_and_fp32_scales_and_casts_the_rest():
    g = torch.Generator().manual_seed(0)
    layer = W8A8Linear(torch.randint(-127, 128, (6 * 8,), dtype=torch.int8, generator=g), torch.rand(6) / 100,
                       torch.randn(6), out_features=6, in_features=8, act_scale=torch.tensor([0.02]),
                       smooth=torch.rand(8) + 0.5)  # fmt: skip
    y32 = layer(torch.randn(3, 8, generator=g))
    layer.half()
    assert (layer.codes.dtype, layer.scale.dtype, layer.act_scale.dtype) == (torch.int8, torch.float32, torch.float32)
    assert layer.smooth.dtype == layer.bias.dtype == torch.float16
    y16 = layer(torch.randn(3, 8, generator=g).half())
    assert y16.dtype == torch.float16 and y16.shape == y32.shape
