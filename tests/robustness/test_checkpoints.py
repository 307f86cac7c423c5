"""Hostile checkpoints: every edit of the manifest or the tensors is a `CheckpointError` naming the
problem; loading is strict like ``load_state_dict``; an interrupted save leaves no temp file."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qbackend
from qbackend.serialization import CheckpointError, LoadResult, load, save
from qbackend.serialization.manifest import DIGEST_KEY, seal
from qbackend.testing.fuzz_checkpoints import TinyNet


def _saved(tmp_path: Path, preset: str = "nf4") -> Path:
    torch.manual_seed(0)
    m = TinyNet().eval()
    qbackend.quantize_(m, {"preset": preset, "min_params": 0})
    return save(m, tmp_path / "m.safetensors")


def _bert(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=50, max_position_embeddings=16)  # fmt: skip
    m = transformers.BertModel(cfg).eval()
    qbackend.quantize_(m, {"preset": "nf4", "min_params": 0})
    return save(m, tmp_path / "bert.safetensors")


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _edit(path: Path, edit, reseal: bool) -> None:
    header, body = _header(path)
    manifest = json.loads(header["__metadata__"]["qbackend"])
    edit(manifest)
    if reseal:
        header["__metadata__"].update(seal(manifest))
    else:
        header["__metadata__"]["qbackend"] = json.dumps(manifest, sort_keys=True)
    _write(path, header, body)


def _config(m):
    return m["model"]["transformers_config"]


# ---- the manifest is covered by the integrity check --------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: _config(m).update(num_attention_heads=8),
        lambda m: _config(m).update(hidden_act="relu"),
        lambda m: _config(m).update(layer_norm_eps=1e-3),
        lambda m: m["layers"].pop(next(iter(m["layers"]))),
        lambda m: m["model"].update({"class": "other.Model"}),
    ],
    ids=["heads", "hidden_act", "layer_norm_eps", "layer-deleted", "class"],
)
def test_an_edited_manifest_does_not_match_its_checksum(tmp_path, edit):
    path = _bert(tmp_path)
    _edit(path, edit, reseal=False)
    with pytest.raises(CheckpointError, match="corrupt checkpoint: the qbackend manifest does not match its checksum"):
        load(path)


def test_a_current_manifest_without_its_checksum_is_refused(tmp_path):
    path = _saved(tmp_path)
    header, body = _header(path)
    del header["__metadata__"][DIGEST_KEY]
    _write(path, header, body)
    with pytest.raises(CheckpointError, match="corrupt checkpoint: format 3 but the manifest has no checksum"):
        load(path, model=TinyNet)


# Resealed edits (a deliberate edit with its checksum recomputed) still meet a field-by-field check.
@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: _config(m).update(hidden_act="nope"), r"cannot build BertModel from the stored config \(KeyError"),
        (lambda m: m["model"].update(transformers_config=[1]), "manifest: transformers_config is list"),
        (lambda m: m["model"].update(transformers_class=5), "manifest: model 'transformers_class' is int"),
        (lambda m: m["model"].update(transformers_class="os.system"), "model class 'os.system' is not a class name"),
        (lambda m: m["model"].update(transformers_class="AutoConfig"), "transformers has no model class 'AutoConfig'"),
        (lambda m: m.update(config={"version": 1, "preset": 5}), r"corrupt config record: unknown QuantConfig dict"),
        (lambda m: m.update(config=[1]), "corrupt qbackend manifest: 'config' is list"),
        (lambda m: m.update(layers=[]), r"corrupt qbackend manifest \(missing 'layers'\)"),
        (lambda m: m["layers"].update(x=3), "corrupt qbackend manifest: layer 'x' is not a record"),
        (lambda m: next(iter(m["tensors"].values())).update(shape=[-1]), "has no dtype/shape"),
        (lambda m: next(iter(m["tensors"].values())).update(dtype="int8"), r"is float32 \[.*\] in the file but 'int8'"),
        (lambda m: m.update(format_version=True), "corrupt qbackend manifest .format_version True."),
    ],
    ids=["hidden_act", "config-list", "class-int", "class-dotted", "class-not-model", "quantconfig", "config-type",
         "layers-list", "layer-int", "shape", "dtype", "version-bool"],  # fmt: skip
)
def test_each_malformed_manifest_field_is_a_checkpoint_error(tmp_path, edit, fragment):
    path = _bert(tmp_path)
    _edit(path, edit, reseal=True)
    with pytest.raises(CheckpointError, match=fragment):
        load(path)


def test_a_tensor_whose_header_dtype_was_changed_is_refused(tmp_path):
    path = _saved(tmp_path, "int8")
    header, body = _header(path)
    header["up.codes"]["dtype"] = "U8"  # same byte length: only the manifest's record of it can tell
    _write(path, header, body)
    with pytest.raises(CheckpointError, match=r"tensor 'up.codes' is uint8 \[6144\] in the file but 'int8' \[6144\]"):
        load(path, model=TinyNet)


def test_a_tensor_whose_header_shape_was_changed_is_refused(tmp_path):
    path = _saved(tmp_path)
    header, body = _header(path)
    assert header["norm.weight"]["shape"] == [96]
    header["norm.weight"]["shape"] = [2, 48]
    _write(path, header, body)
    with pytest.raises(CheckpointError, match=r"'norm.weight' is float32 \[2, 48\] in the file but 'float32' \[96\]"):
        load(path, model=TinyNet)


# ---- strict loading -------------------------------------------------------------------------------


class Bigger(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(32, 8)
        self.gain = nn.Parameter(torch.ones(8))


class Smaller(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96)


def test_a_layer_the_checkpoint_lacks_is_an_error_by_default(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"does not hold 'gain', 'extra.weight', 'extra.bias' \(3 in all\), "
                                              r"which the model has; .*strict=False"):  # fmt: skip
        load(path, model=Bigger())


def test_strict_false_returns_the_missing_keys(tmp_path):
    path = _saved(tmp_path)
    target = Bigger()
    before = target.extra.weight.detach().clone()
    result = load(path, model=target, strict=False)
    assert isinstance(result, LoadResult)
    assert result.missing_keys == ["gain", "extra.weight", "extra.bias"] and result.unexpected_keys == []
    assert result.model is target and torch.equal(target.extra.weight, before)  # kept its own values
    assert isinstance(target.up, qbackend.QuantizedLinear)


def test_checkpoint_entries_the_model_lacks_are_an_error_listing_them(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"the model has no 'down', 'norm.bias', 'norm.weight' \(3 in all\)"):
        load(path, model=Smaller())


def test_strict_false_returns_the_unexpected_keys(tmp_path):
    path = _saved(tmp_path)
    result = load(path, model=Smaller(), strict=False)
    assert result.unexpected_keys == ["down", "norm.bias", "norm.weight"] and result.missing_keys == []
    assert isinstance(result.model.up, qbackend.QuantizedLinear)


def test_a_meta_skeleton_still_needs_every_tensor_with_strict_false(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"does not hold 'gain', 'extra.weight', 'extra.bias'"):
        load(path, model=Bigger, strict=False)


def test_strict_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="strict must be True or False; got str"):
        load(_saved(tmp_path), model=TinyNet, strict="no")


# ---- interrupted saves --------------------------------------------------------------------------------


def _temps(d: Path) -> list[Path]:
    return sorted(d.glob(".*.tmp"))


def test_an_interrupted_save_removes_its_temp_file(tmp_path, monkeypatch):
    import safetensors.torch

    torch.manual_seed(0)
    m = TinyNet().eval()
    qbackend.quantize_(m, {"preset": "int8", "min_params": 0})

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(m, tmp_path / "m.safetensors")
    assert _temps(tmp_path) == [] and not (tmp_path / "m.safetensors").exists()


def test_a_killed_save_leaves_a_temp_file_the_next_save_removes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".m.safetensors.{int(dead.stdout)}.abc123.tmp"
    orphan.write_bytes(b"x" * 4096)
    mine = tmp_path / f".m.safetensors.{os.getpid()}.live.tmp"  # a save in progress in a live process
    mine.write_bytes(b"y")
    _saved(tmp_path, "int8")
    assert _temps(tmp_path) == [mine]


def test_sigterm_during_a_save_removes_the_temp_file(tmp_path):
    script = f"""
import os, signal, torch, qbackend, safetensors.torch
from qbackend.testing.fuzz_checkpoints import TinyNet
m = TinyNet(); qbackend.quantize_(m, {{"preset": "int8", "min_params": 0}})
real = safetensors.torch.save_file
def slow(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-save, after the temp file is full-size
safetensors.torch.save_file = slow
qbackend.save(m, {str(tmp_path / "m.safetensors")!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert _temps(tmp_path) == [] and not (tmp_path / "m.safetensors").exists()


# ---- format 1 (no manifest checksum): a deleted alias --------------------------------------------------


def _fixture_models():
    import importlib.util

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
    spec = importlib.util.spec_from_file_location("checkpoint_fixture_models_r", folder / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return folder, mod


@pytest.mark.parametrize(("alias", "fragment"), [("tied.codes", "layer 'tied': tied.codes: missing"),
                                                 ("tied.nested_offset", "layer 'tied': tied.nested_offset: missing")])
def test_a_format_1_file_with_an_alias_deleted_is_refused(tmp_path, alias, fragment):
    folder, models = _fixture_models()
    path = tmp_path / "nf4.safetensors"
    path.write_bytes((folder / "nf4.safetensors").read_bytes())
    header, body = _header(path)
    manifest = json.loads(header["__metadata__"]["qbackend"])
    assert manifest["format_version"] == 1
    del manifest["aliases"][alias]
    header["__metadata__"]["qbackend"] = json.dumps(manifest)
    _write(path, header, body)
    with pytest.raises(CheckpointError, match=fragment):
        load(path, model=models.net)
