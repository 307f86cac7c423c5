"""Corrupt or mismatched checkpoints (both formats) are refused with a `CheckpointError` that says
what is wrong, never a raw RuntimeError/TypeError from deeper down."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import qbackend
from qbackend import QATConfig, QuantizedLinear
from qbackend.formats import Scheme
from qbackend.serialization import CheckpointError, load, load_config, save
from qbackend.serialization.manifest import seal, tensor_entry


def _fixtures_dir() -> Path:
    for parent in Path(__file__).resolve().parents:
        d = parent / "fixtures" / "checkpoints"
        if d.is_dir():
            return d
    raise FileNotFoundError("tests/fixtures/checkpoints not found")


FIXTURES = _fixtures_dir()


def _skeleton() -> nn.Module:
    return nn.Sequential(nn.Linear(80, 48), nn.ReLU(), nn.Linear(48, 24, bias=False))


def _model(scheme: Scheme) -> nn.Module:
    torch.manual_seed(0)
    m = _skeleton().eval()
    for i in (0, 2):
        m[i] = QuantizedLinear.from_weight(m[i].weight, m[i].bias, scheme, name=str(i))
    return m


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


def _replace_tensor(path: Path, name: str, value: torch.Tensor) -> None:
    """Store ``value`` under ``name``, with a matching checksum (a well-formed file with a bad record)."""
    with safe_open(str(path), "pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
        metadata = st.metadata()
    tensors[name] = value
    manifest = json.loads(metadata["qbackend"])
    manifest["tensors"][name].update({k: v for k, v in tensor_entry(value).items() if k != "uses"})
    save_file(tensors, str(path), metadata=seal(manifest))


def _v1_copy(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.safetensors"
    shutil.copy(FIXTURES / f"{name}.safetensors", path)
    return path


# ---- the layer scheme ----------------------------------------------------------------------------


def test_a_layer_scheme_that_does_not_fit_its_weight_is_refused(tmp_path):
    path = save(_model(Scheme("nf4", blocksize=64)), tmp_path / "m.safetensors")
    _edit_manifest(path, lambda m: m["layers"]["0"].update(scheme=Scheme("fp4", blocksize=64).as_dict()))
    with pytest.raises(CheckpointError, match=r"layer '0': its scheme fp4-b64 does not fit its weight's nf4-b64"):
        load(path, _skeleton)


def test_nested_int_groups_keep_their_layer_scheme(tmp_path, no_quantize):
    scheme = Scheme("int", 4, True, "block", blocksize=32, nested=True)
    path = save(_model(scheme), tmp_path / "m.safetensors")
    no_quantize()
    assert load(path, _skeleton)[0].scheme == scheme


def test_nested_is_the_only_difference_a_layer_scheme_may_have(tmp_path):
    path = save(_model(Scheme("int", 4, True, "block", blocksize=32, nested=True)), tmp_path / "m.safetensors")
    other = Scheme("int", 4, True, "block", blocksize=64, nested=True).as_dict()
    _edit_manifest(path, lambda m: m["layers"]["0"].update(scheme=other))
    with pytest.raises(CheckpointError, match=r"its scheme int4-sym-g64-nested does not fit its weight's int4-sym-g32"):
        load(path, _skeleton)


# ---- format 1: the weight is validated -----------------------------------------------------------


def test_format_1_weight_is_validated(tmp_path):
    path = _v1_copy(tmp_path, "int4")
    _edit_manifest(path, lambda m: m["aliases"].update({"down.scale": "down.codes"}))
    with pytest.raises(CheckpointError, match=r"layer 'down': down\.weight\.scale: dtype torch\.uint8"):
        load(path, _factory_v1())


def _factory_v1():
    import importlib.util

    spec = importlib.util.spec_from_file_location("checkpoint_fixture_models", FIXTURES / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Net


# ---- the manifest's tensor entries ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e.update(uses=5), r"tensor '0\.codes' has bad 'uses'"),
        (lambda e: e.update(uses=[["0.codes", "weight"]]), r"tensor '0\.codes' has bad 'uses'"),
        (lambda e: e.update(uses=[[5, "buffer"]]), r"tensor '0\.codes' has bad 'uses'"),
        (lambda e: e.pop("digest"), r"tensor '0\.codes' has no digest"),
    ],
    ids=["uses-int", "bad-kind", "bad-name", "no-digest"],
)
def test_bad_tensor_entries_are_refused(tmp_path, edit, message):
    path = save(_model(Scheme("nf4")), tmp_path / "m.safetensors")
    _edit_manifest(path, lambda m: edit(m["tensors"]["0.codes"]))
    with pytest.raises(CheckpointError, match=r"corrupt qbackend manifest: " + message):
        load(path, _skeleton)


def test_a_tensor_entry_that_is_not_a_dict_is_refused(tmp_path):
    path = save(_model(Scheme("nf4")), tmp_path / "m.safetensors")
    _edit_manifest(path, lambda m: m["tensors"].update({"0.codes": []}))
    with pytest.raises(CheckpointError, match=r"corrupt qbackend manifest: tensor '0\.codes' has no digest"):
        load(path, _skeleton)


def test_format_1_bad_uses_are_refused(tmp_path):
    path = _v1_copy(tmp_path, "int4")
    _edit_manifest(path, lambda m: m["tensors"]["down.codes"].update(uses=[["x"]]))
    with pytest.raises(CheckpointError, match=r"corrupt qbackend manifest: tensor 'down\.codes' has bad 'uses'"):
        load(path, _factory_v1())


# ---- the model the layers go into ----------------------------------------------------------------


def test_a_layer_of_another_shape_than_the_models_is_refused(tmp_path):
    path = save(_model(Scheme("nf4")), tmp_path / "m.safetensors")

    def smaller() -> nn.Module:
        return nn.Sequential(nn.Linear(80, 40), nn.ReLU(), nn.Linear(40, 24, bias=False))

    with pytest.raises(
        CheckpointError, match=r"layer '0' has weight shape \(48, 80\) in the checkpoint but \(40, 80\)"
    ):
        load(path, smaller)


def test_the_shape_check_reads_gpt2_conv1d_weights_as_in_out(tmp_path):
    # transformers' Conv1D stores its weight [in, out]: a matching layer loads, a mismatched one is named
    from transformers.pytorch_utils import Conv1D  # transformers comes with the examples extra (make test installs it)

    def model(out: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(Conv1D(out, 128))

    m = model(256)
    qbackend.quantize_(m, {"preset": "int8", "min_params": 0})
    path = save(m, tmp_path / "c.safetensors")
    x = torch.randn(2, 128)
    assert torch.equal(load(path, lambda: model(256))(x), m(x))
    with pytest.raises(CheckpointError, match=r"weight shape \(256, 128\) in the checkpoint but \(192, 128\)"):
        load(path, lambda: model(192))


# ---- QAT activation scale ------------------------------------------------------------------------


def _qat_static(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    m = _skeleton().train()
    qbackend.qat.prepare(m, {"preset": "int4", "min_params": 0, "qat": QATConfig(activations="static")})
    with torch.no_grad(), qbackend.qat.eager_qat(m):
        m(torch.randn(4, 80))
    qbackend.convert(m.eval())
    return save(m, tmp_path / "m.safetensors")


def test_a_qat_act_scale_of_the_wrong_size_is_refused(tmp_path):
    path = _qat_static(tmp_path)
    _replace_tensor(path, "0.act_scale", torch.ones(3))
    with pytest.raises(CheckpointError, match=r"QAT layer '0': act_scale must be one float32 value; got 3 float32"):
        load(path, _skeleton)


def test_a_runtime_error_building_a_layer_is_a_checkpoint_error(tmp_path, monkeypatch):
    path = _qat_static(tmp_path)

    def refuses(*args, **kwargs):
        raise RuntimeError("shape '[]' is invalid\nlong detail")

    monkeypatch.setattr("qbackend.workflows.qat.records.QATQuantizedLinear", refuses)
    with pytest.raises(CheckpointError, match=r"corrupt record for quantized layer '0' \(shape '\[\]' is invalid\)$"):
        load(path, _skeleton)


# ---- the config record ---------------------------------------------------------------------------


def test_a_malformed_config_pattern_is_a_checkpoint_error(tmp_path):
    path = save(_skeleton(), tmp_path / "m.safetensors", preset="int4", min_params=0)
    _edit_manifest(path, lambda m: m["config"].update(include=5))
    with pytest.raises(CheckpointError, match=r"corrupt config record: QuantConfig dict 'include': expected a list"):
        load_config(path)
