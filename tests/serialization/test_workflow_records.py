"""Save/load dispatch through the workflow registry: a toy workflow registered from this file saves and
loads its own layer through its ``record``/``build`` handlers, with no edit to ``qbackend.serialization``."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import qbackend
from qbackend.core import registry
from qbackend.core.registry import Workflow, register_workflow
from qbackend.formats import LayerRecord, QuantizedWeight, RecordError, Scheme, quantize
from qbackend.passes.modules import linear_modules
from qbackend.passes.report import Report
from qbackend.serialization import CheckpointError, load, save
from qbackend.serialization.manifest import seal

TOY_SCHEME = Scheme("int", 8, symmetric=True, granularity="channel", axis=0)


@dataclass(frozen=True)
class ToyConfig:
    factor: float = 2.0


class ToyQuantLinear(nn.Module):
    """int8 weights dequantized on every call, output times ``factor`` plus a per-output ``shift``."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, factor: float, shift: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.register_buffer("codes", qw.codes)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("shift", shift)
        self.bias, self.factor = bias, factor

    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(TOY_SCHEME, (self.out_features, self.in_features), torch.float32, self.codes, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().dequantize(x.dtype), self.bias) * self.factor + self.shift


def quantize_toy(model: nn.Module, config: ToyConfig, example_inputs: object) -> Report:
    for name, parent, child, mod in list(linear_modules(model)):
        qw = quantize(mod.weight.detach(), TOY_SCHEME, name=f"{name}.weight")
        shift = torch.arange(mod.out_features, dtype=torch.float32) / 10
        setattr(parent, child, ToyQuantLinear(qw, mod.bias, config.factor, shift))
    return Report(graphs=0)


def record_toy(m: nn.Module, name: str) -> LayerRecord | None:
    if not isinstance(m, ToyQuantLinear):
        return None
    return LayerRecord("toy", m.weight(), m.bias, options={"factor": m.factor}, tensors={"shift": m.shift})


def build_toy(rec: LayerRecord, name: str, kernel_weights: dict) -> ToyQuantLinear:
    factor = rec.options["factor"]
    if not factor > 0:
        raise RecordError(f"toy layer {name!r}: factor must be > 0, got {factor}")
    return ToyQuantLinear(rec.weight, rec.bias, factor, rec.tensors["shift"])


def _not_compiled(*args):
    raise AssertionError("save/load must not compile")


TOY = Workflow("toy_layers", compile=_not_compiled, quantize=quantize_toy, config_type=ToyConfig,
               modules=(ToyQuantLinear,), record=record_toy, build=build_toy,
               record_kinds={"toy": (("factor",), ("shift",))})  # fmt: skip


@pytest.fixture
def toy():
    register_workflow(TOY)
    yield TOY
    registry.unregister_workflow(TOY.name)


def _skeleton() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = _skeleton().eval()
    qbackend.quantize_(model, ToyConfig(factor=3.0))
    return model


def _manifest(path: Path) -> dict:
    with safe_open(str(path), "pt") as st:
        return json.loads(st.metadata()["qbackend"])


def _edit_manifest(path: Path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["qbackend"])
    edit(manifest)
    header["__metadata__"].update(seal(manifest))
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_a_registered_workflow_saves_and_loads_its_own_layers(tmp_path, toy):
    model, x = _toy_model(), torch.randn(4, 16)
    path = save(model, tmp_path / "m.safetensors")
    manifest = _manifest(path)
    assert manifest["config"] is None  # quantized before saving: stored as it is
    assert {n: (r["kind"], r["options"], sorted(r["tensors"])) for n, r in manifest["layers"].items()} == {
        "0": ("toy", {"factor": 3.0}, ["shift"]), "2": ("toy", {"factor": 3.0}, ["shift"])}  # fmt: skip
    assert "ToyQuantLinear" not in json.dumps(manifest["layers"])  # a record names no module class
    loaded = load(path, _skeleton)
    assert type(loaded[0]) is ToyQuantLinear and type(loaded[2]) is ToyQuantLinear and loaded[2].bias is None
    for i in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(model[i].buffers(), loaded[i].buffers(), strict=True))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_toy_and_builtin_layers_load_side_by_side(tmp_path, toy, no_quantize):
    model, x = _toy_model(), torch.randn(4, 16)
    torch.manual_seed(1)
    lin = nn.Linear(32, 8, bias=False)
    model[2] = qbackend.QuantizedLinear.from_weight(lin.weight, None, Scheme("nf4", blocksize=64), name="2")
    path = save(model, tmp_path / "m.safetensors")
    assert [r["kind"] for r in _manifest(path)["layers"].values()] == ["toy", "weight_only"]
    no_quantize()
    loaded = load(path, _skeleton)
    assert type(loaded[0]) is ToyQuantLinear and type(loaded[2]) is qbackend.QuantizedLinear
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_workflow_error_is_shown_as_is(tmp_path, toy):
    path = save(_toy_model(), tmp_path / "m.safetensors")
    _edit_manifest(path, lambda m: m["layers"]["0"]["options"].update(factor=-1.0))
    with pytest.raises(CheckpointError, match=r"m.safetensors: toy layer '0': factor must be > 0, got -1.0"):
        load(path, _skeleton)


def test_an_undeclared_option_is_refused(tmp_path, toy):
    path = save(_toy_model(), tmp_path / "m.safetensors")
    _edit_manifest(path, lambda m: m["layers"]["0"]["options"].update(activation="token"))
    with pytest.raises(CheckpointError, match=r"layer '0' \(toy\) has unknown entries \['activation'\]"):
        load(path, _skeleton)


def test_without_the_workflow_its_kind_is_unknown(tmp_path, toy):
    path = save(_toy_model(), tmp_path / "m.safetensors")
    registry.unregister_workflow(TOY.name)
    with pytest.raises(CheckpointError, match=r"layer '0' is of kind 'toy', which this qbackend does not know"):
        load(path, _skeleton)


def test_a_kind_no_workflow_builds_is_refused_at_save(tmp_path, toy):
    model = _toy_model()
    records_only = Workflow("toy_layers", compile=_not_compiled, modules=(ToyQuantLinear,), record=record_toy)
    register_workflow(records_only, replace=True)  # describes its layers, declares no kind
    with pytest.raises(CheckpointError, match=r"cannot save quantized layer '0': .* kind 'toy', which no workflow"):
        save(model, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_a_record_no_workflow_builds_is_refused_at_load(tmp_path, toy):
    path = save(_toy_model(), tmp_path / "m.safetensors")
    declines = Workflow("toy_layers", compile=_not_compiled, modules=(ToyQuantLinear,), record=record_toy,
                        build=lambda rec, name, kw: None, record_kinds=TOY.record_kinds)  # fmt: skip
    register_workflow(declines, replace=True)
    with pytest.raises(
        CheckpointError, match=r"layer '0' is a 'toy' record that no workflow builds with options \['factor'\];"
    ):
        load(path, _skeleton)


def test_extension_order_asks_registered_then_dependent_builtins_first(toy):
    names = [wf.name for wf in registry.extension_order()]
    assert names[0] == "toy_layers"
    assert names.index("qat") < names.index("weight_only") and names.index("w8a8") < names.index("weight_only")
    expected = (frozenset({"activations"}), frozenset({"act_scale", "input_scale"}))  # QAT's and AWQ's
    assert registry.record_kinds()["weight_only"] == expected
