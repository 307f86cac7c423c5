"""Checkpoint format 2: per layer a format record (no kernel op), exact round trips of every stored
format, QAT activation layers, the config record, and clear errors for corrupt records."""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import qbackend
from qbackend import QATConfig, QuantConfig, QuantizedLinear
from qbackend.formats import Scheme
from qbackend.serialization import CheckpointError, load, load_config, save
from qbackend.serialization.manifest import seal
from qbackend.workflows.qat.deploy import QATQuantizedLinear

SCHEMES = [
    Scheme("nf4", blocksize=64),
    Scheme("nf4", blocksize=64, nested=True),
    Scheme("fp4", blocksize=128, nested=True),
    Scheme("int", 4, True, "block", blocksize=32),
    Scheme("int", 4, False, "block", blocksize=64),
    Scheme("int", 4, True, "block", blocksize=32, nested=True),
    Scheme("int", 4, True, "channel"),
    Scheme("int", 4, False, "channel"),
    Scheme("int", 4, False, "tensor"),
    Scheme("int", 8, True, "channel"),
    Scheme("int", 8, True, "tensor"),
]


def _skeleton() -> nn.Module:
    return nn.Sequential(nn.Linear(80, 48), nn.ReLU(), nn.Linear(48, 24, bias=False))


def _model(scheme: Scheme) -> nn.Module:
    torch.manual_seed(0)
    m = _skeleton().eval()
    for i in (0, 2):
        m[i] = QuantizedLinear.from_weight(m[i].weight, m[i].bias, scheme, name=str(i))
    return m


def _manifest(path: Path) -> dict:
    with safe_open(str(path), "pt") as st:
        return json.loads(st.metadata()["qbackend"])


@pytest.mark.parametrize("scheme", SCHEMES, ids=[s.name for s in SCHEMES])
def test_every_stored_format_round_trips_exactly(tmp_path, scheme, no_quantize):
    m = _model(scheme)
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(1))
    path = save(m, tmp_path / "m.safetensors")
    no_quantize()
    loaded = load(path, _skeleton)
    for i in (0, 2):
        assert type(loaded[i]) is QuantizedLinear and loaded[i].scheme == scheme
        want, got = dict(m[i].named_buffers()), dict(loaded[i].named_buffers())
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want), scheme.name
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    rec = _manifest(path)["layers"]["0"]
    assert rec["kind"] == "weight_only" and rec["format"] == scheme.name
    stored = Scheme.from_dict(rec["weight"]["scheme"])
    if scheme.kind == "int" and scheme.nested:  # the kernels hold nested int4 constants decoded: stored plain
        assert not stored.nested and Scheme.from_dict(rec["scheme"]) == scheme
    else:
        assert stored == scheme and "scheme" not in rec


def test_the_manifest_names_no_kernel_op(tmp_path):
    path = save(_model(Scheme("nf4", nested=True)), tmp_path / "m.safetensors")
    manifest = _manifest(path)
    text = json.dumps(manifest)
    assert "_linear" not in text and "statics" not in text and "aliases" not in manifest
    with safe_open(str(path), "pt") as st:
        keys = set(st.keys())
    # the weight's named tensors (QuantizedWeight.as_dict), no code tables (constants of the format)
    assert {k for k in keys if k.startswith("0.")} == {"0.codes", "0.nested_codes", "0.nested_absmax",
                                                       "0.nested_offset", "0.bias"}  # fmt: skip


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_qat_layers_that_quantize_their_input_keep_it(tmp_path, activations, no_quantize):
    torch.manual_seed(0)
    m = _skeleton().train()
    qbackend.qat.prepare(m, {"preset": "int4", "min_params": 0, "qat": QATConfig(activations=activations)})
    with torch.no_grad(), qbackend.qat.eager_qat(m):
        m(torch.randn(4, 80))  # the static observer sees a batch
    qbackend.convert(m.eval())
    assert isinstance(m[0], QATQuantizedLinear)
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(1))
    path = save(m, tmp_path / "m.safetensors")
    no_quantize()
    loaded = load(path, _skeleton)
    assert isinstance(loaded[0], QATQuantizedLinear) and loaded[0].activations == activations
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    assert _manifest(path)["layers"]["0"]["options"] == {"activations": activations}


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 24)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_a_layer_used_twice_is_recorded_under_both_names(tmp_path):
    m = _Twice()
    m.a = m.b = QuantizedLinear.from_weight(torch.randn(24, 24), None, Scheme("int", 8, True, "channel"))
    path = save(m, tmp_path / "m.safetensors")
    assert set(_manifest(path)["layers"]) == {"a", "b"}
    loaded = load(path, _Twice)
    assert loaded.a.codes is loaded.b.codes  # one set of kernel tensors
    x = torch.randn(2, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_the_config_is_stored_as_a_record_that_rebuilds_it(tmp_path):
    torch.manual_seed(0)
    options = {"preset": "int4", "blocksize": 32, "min_params": 0, "exclude": ["2"]}
    path = save(_skeleton(), tmp_path / "m.safetensors", **options)
    assert _manifest(path)["config"]["version"] == 2
    assert load_config(path) == QuantConfig.from_options(options)
    assert load_config(save(_model(Scheme("nf4")), tmp_path / "q.safetensors")) is None  # quantized before save


# ---- corrupt records ------------------------------------------------------------------------------


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


def _layer(m: dict) -> dict:
    return m["layers"]["0"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: _layer(m).update(kind="fp8"), r"layer '0' is of kind 'fp8', which this qbackend does not know"),
        (lambda m: _layer(m)["weight"]["scheme"].update(version=7), r"layer '0': 0.weight.scheme: scheme version 7"),
        (lambda m: _layer(m)["weight"].update(version=3), r"0.weight: quantized-weight record version 3"),
        (lambda m: _layer(m)["weight"]["tensors"].update(codes="nope"), r"weight tensor 'codes' \('nope'\) is not in"),
        (lambda m: _layer(m)["weight"]["tensors"].pop("scale"), r"0.weight.scale: missing"),
        (lambda m: _layer(m)["options"].update(rounding=1), r"layer '0' \(weight_only\) has unknown entries"),
        (lambda m: _layer(m)["options"].update(activations="fp8"), r"layer '0' \(unknown activations 'fp8'\)"),
        (lambda m: _layer(m)["weight"].update(shape=[48, 81]), r"layer '0': 0.weight.codes: .* elements"),
        (lambda m: _layer(m).pop("weight"), r"corrupt record for quantized layer '0' \(KeyError"),
        (lambda m: m.update(format_version=0), r"checkpoint format 0 is no longer supported"),
    ],
    ids=["kind", "scheme-version", "weight-version", "tensor-name", "missing-tensor", "unknown-option",
         "bad-activations", "shape", "no-weight", "too-old"],  # fmt: skip
)
def test_corrupt_record_errors_name_the_file_and_layer(tmp_path, edit, message):
    path = save(_model(Scheme("int", 4, True, "block", blocksize=32)), tmp_path / "m.safetensors")
    _edit_manifest(path, edit)
    with pytest.raises(CheckpointError, match=r"m.safetensors: .*" + message):
        load(path, _skeleton)


def test_w8a8_activation_mode_must_fit_its_scale(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="W8A8 without a calibration"):
        path = save(_skeleton(), tmp_path / "m.safetensors", preset="w8a8", min_params=0)
    _edit_manifest(path, lambda m: _layer(m)["options"].update(activation="tensor"))
    with pytest.raises(CheckpointError, match=r"W8A8 layer '0': activation 'tensor' does not fit its act_scale"):
        load(path, _skeleton)


# ---- structure ------------------------------------------------------------------------------------


def test_serialization_modules_import_no_cycle_and_no_workflow():
    """Layers are built through the workflows' handlers: no serialization module imports a workflow or a layer class."""
    pkg = Path(qbackend.__file__).parent / "serialization"
    graph, layer_classes = {}, []
    for f in pkg.glob("*.py"):
        tree = ast.parse(f.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.add(node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                assert not node.module.startswith("workflows"), f"{f.name} imports ..{node.module}"
                if any(a.name in ("QuantizedLinear", "W8A8Linear", "QATQuantizedLinear") for a in node.names):
                    layer_classes.append(f.stem)
            if isinstance(node, ast.Import):
                assert not any("workflows" in a.name for a in node.names), f.name
        graph[f.stem] = deps
    assert layer_classes == []

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        for dep in graph.get(node, ()):
            visit(dep, (*path, node))

    for mod in graph:
        visit(mod, ())


def test_a_layer_missing_a_buffer_is_named_at_save(tmp_path):
    m = _model(Scheme("nf4", blocksize=64))
    del m[0]._buffers["absmax"]  # e.g. a module whose buffers were renamed
    with pytest.raises(CheckpointError, match=r"cannot save quantized layer '0': 0.absmax: missing"):
        save(m, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written
