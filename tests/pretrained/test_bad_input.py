"""Broken directories: each a CheckpointError (or ConfigError) naming the file and the tensor."""

from __future__ import annotations

import json
import shutil

import pytest

import qbackend
from qbackend.serialization import CheckpointError

pytest.importorskip("transformers")

OPTIONS = {"format": "nf4", "min_params": 0}


@pytest.fixture
def copy_of(copy_dir):
    return copy_dir


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _shards(d):
    return sorted(d.glob("*.safetensors"))


def test_missing_shard(float_dir, copy_of):
    d = copy_of(float_dir)
    gone = _shards(d)[-1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=rf"{gone.name}: missing shard \(the index .* puts tensor '.+' and"):
        qbackend.from_pretrained(d, OPTIONS, progress=False)


def test_truncated_shard(float_dir, copy_of):
    d = copy_of(float_dir)
    f = _shards(d)[0]
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=rf"{f.name}: not a readable safetensors file .*truncated or corrupt"):
        qbackend.from_pretrained(d, OPTIONS, progress=False)


def test_shard_shapes_do_not_match_config(float_dir, copy_of):
    d = copy_of(float_dir)
    _edit_json(d / "config.json", intermediate_size=384)
    want = (
        r"model-0000\d-of-0000\d.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
        r"\[256, 128\], but the model built from config.json has \[384, 128\]"
    )
    with pytest.raises(CheckpointError, match=want):
        qbackend.from_pretrained(d, OPTIONS, progress=False)


def test_shard_holds_a_tensor_config_does_not_have(float_dir, copy_of):
    d = copy_of(float_dir)
    _edit_json(d / "config.json", num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"safetensors: holds tensor 'model.layers.1.[a-z_.]+' \(and \d+ more\), "
                                              "which the model built from config.json does not have"):  # fmt: skip
        qbackend.from_pretrained(d, OPTIONS, progress=False)


def test_tensor_missing_from_shards(tmp_path, make_llama):
    from safetensors.torch import save_file

    model = make_llama()
    model.save_pretrained(tmp_path / "m")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"m: tensor 'model.norm.weight' is missing from the shards"):
        qbackend.from_pretrained(tmp_path / "m", OPTIONS, progress=False)


def test_index_points_at_the_wrong_shard(float_dir, copy_of):
    d = copy_of(float_dir)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][key] = files[1]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{files[1]}: the index .* places tensor '{key}' there, but the file"):
        qbackend.from_pretrained(d, OPTIONS, progress=False)


def test_missing_config_json(float_dir, copy_of):
    d = copy_of(float_dir)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        qbackend.from_pretrained(d, OPTIONS, progress=False)


@pytest.mark.parametrize(("qc", "message"), [
    ({"quant_method": "gptq", "bits": 4}, "quantization_config is from 'gptq', which qbackend does not read"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes 8-bit .* 4-bit ones only"),
    ({"quant_method": "qbackend", "version": "9.0", "format_version": 99},
     "written by qbackend 9.0 in checkpoint format 99; this qbackend reads format 3: upgrade qbackend"),
    ({"quant_method": "qbackend"}, "qbackend quantization_config has no integer 'format_version'"),
    ("nf4", "quantization_config is str; expected an object"),
])  # fmt: skip
def test_quantization_config_from_another_tool_or_version(float_dir, copy_of, qc, message):
    d = copy_of(float_dir)
    _edit_json(d / "config.json", quantization_config=qc)
    with pytest.raises(CheckpointError, match=rf"config.json: .*{message}"):
        qbackend.from_pretrained(d, progress=False)


@pytest.fixture(scope="module")
def saved(float_dir, tmp_path_factory):
    model = qbackend.from_pretrained(float_dir, OPTIONS, progress=False)
    return qbackend.save_pretrained(model, tmp_path_factory.mktemp("saved") / "q", max_shard_size="40KB")


def test_options_for_a_quantized_directory(saved):
    with pytest.raises(CheckpointError, match=r"q: is quantized already \(qbackend\); it loads as stored"):
        qbackend.from_pretrained(saved, "int8")


def test_corrupt_tensor_in_a_saved_directory(saved, copy_of):
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = copy_of(saved)
    f = _shards(d)[1]
    with safe_open(str(f), "pt") as st:
        meta, tensors = st.metadata(), {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"{f.name}: corrupt checkpoint: tensor '{key}' does not match its"):
        qbackend.from_pretrained(d, progress=False)


def test_shards_of_two_saves_mixed(saved, copy_of, tmp_path, float_dir):
    d = copy_of(saved)
    model = qbackend.from_pretrained(float_dir, {**OPTIONS, "compute": "fp32"}, progress=False)  # same tensors
    other = qbackend.save_pretrained(model, tmp_path / "other", max_shard_size="40KB")
    f = _shards(d)[1]
    shutil.copy(other / f.name, f)
    with pytest.raises(CheckpointError, match=rf"{f.name}: belongs to another save than model-00001"):
        qbackend.from_pretrained(d, progress=False)


def test_truncated_saved_shard(saved, copy_of):
    d = copy_of(saved)
    f = _shards(d)[-1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{f.name}: not a readable safetensors file"):
        qbackend.from_pretrained(d, progress=False)


def test_quantize_error_names_tensor_and_file(float_dir, copy_of):
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = copy_of(float_dir)
    f = _shards(d)[0]
    with safe_open(str(f), "pt") as st:
        meta, tensors = st.metadata(), {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    key = next(k for k in tensors if k.endswith("proj.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"{f.name}: cannot quantize '{key}'"):
        qbackend.from_pretrained(d, OPTIONS, progress=False)
