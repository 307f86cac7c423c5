"""qbackend.save_pretrained: a sharded directory that from_pretrained loads as stored, written atomically."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import qbackend
from qbackend.pretrained import save as save_module
from qbackend.serialization import FORMAT_VERSION, CheckpointError

transformers = pytest.importorskip("transformers")

OPTIONS = {"format": "nf4", "min_params": 0}


@pytest.fixture(scope="module")
def quantized(float_dir):
    return qbackend.from_pretrained(float_dir, OPTIONS, progress=False)


def test_directory_layout_and_quantization_config(quantized, tmp_path):
    out = qbackend.save_pretrained(quantized, tmp_path / "nf4", max_shard_size="40KB")
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and all(f.startswith("model-") for f in shards)
    assert {"config.json", "model.safetensors.index.json", "generation_config.json"} <= set(files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    from safetensors import safe_open

    for f in shards:  # at most the limit per shard, but for one tensor larger than it alone
        with safe_open(str(out / f), "pt") as st:
            sizes = [st.get_tensor(k).nbytes for k in st.keys()]  # noqa: SIM118
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "qbackend" and qc["format_version"] == FORMAT_VERSION
    assert qc["version"] == qbackend.__version__
    assert qc["config"]["format"] == "nf4" and qc["config"]["min_params"] == 0
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == 128


def test_reload_is_identical_without_requantizing(quantized, tmp_path, tokens, logits, no_quantize, monkeypatch):
    out = qbackend.save_pretrained(quantized, tmp_path / "nf4", max_shard_size="40KB")
    no_quantize()
    monkeypatch.setattr("qbackend.formats.QuantizedWeight.dequantize", lambda *a, **k: pytest.fail("float weight"))
    again = qbackend.from_pretrained(out, progress=False)
    assert torch.equal(logits(again, tokens), logits(quantized, tokens))
    assert again.qbackend_config == quantized.qbackend_config
    # the single-shard form is also a qbackend.save checkpoint: qbackend.load reads it
    one = qbackend.save_pretrained(again, tmp_path / "one")
    assert [p.name for p in one.glob("*.safetensors")] == ["model.safetensors"]
    assert torch.equal(logits(qbackend.load(one / "model.safetensors"), tokens), logits(quantized, tokens))


def test_float_model_is_quantized_on_a_copy(float_dir, tmp_path, tokens, logits):
    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float16).eval()
    out = qbackend.save_pretrained(model, tmp_path / "q", options=OPTIONS)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # the user's model is untouched
    ref = qbackend.from_pretrained(float_dir, OPTIONS, progress=False)
    assert torch.equal(logits(qbackend.from_pretrained(out, progress=False), tokens), logits(ref, tokens))


def test_tied_model_roundtrip(tied_dir, tmp_path, tokens, logits):
    model = qbackend.from_pretrained(tied_dir, OPTIONS, progress=False)
    again = qbackend.from_pretrained(qbackend.save_pretrained(model, tmp_path / "t"), progress=False)
    assert torch.equal(logits(again, tokens), logits(model, tokens))


def test_tokenizer_files_are_copied(quantized, tmp_path):
    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "tokenizer_config.json").write_text("{}")
    (src / "unrelated.bin").write_bytes(b"x")
    out = qbackend.save_pretrained(quantized, tmp_path / "q", tokenizer=src)
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}' and (out / "tokenizer_config.json").exists()
    assert not (out / "unrelated.bin").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty: holds no tokenizer file"):
        qbackend.save_pretrained(quantized, tmp_path / "q2", tokenizer=empty)
    assert not (tmp_path / "q2").exists()


def test_overwrite_replaces_the_whole_directory(quantized, tmp_path):
    out = tmp_path / "q"
    qbackend.save_pretrained(quantized, out, max_shard_size="40KB")
    qbackend.save_pretrained(quantized, out)  # fewer files now: no stale shard may remain
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_previous_directory_intact(quantized, tmp_path, monkeypatch):
    out = qbackend.save_pretrained(quantized, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(CheckpointError, match=r"model.safetensors: no space left on the device while writing tensor"):
        qbackend.save_pretrained(quantized, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staged copy is gone


def test_not_enough_disk_space_is_refused_before_writing(quantized, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(save_module.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match=r"q: not enough disk space: the checkpoint needs .* GiB"):
        qbackend.save_pretrained(quantized, tmp_path / "q")
    assert not list(tmp_path.iterdir())


def test_killed_save_keeps_previous_directory(float_dir, tmp_path):
    """SIGKILL in the middle of writing shards: the previous directory is as it was; the next save cleans up."""
    out = tmp_path / "q"
    script = textwrap.dedent(f"""
        import os, signal, safetensors.torch, qbackend
        model = qbackend.from_pretrained({str(float_dir)!r}, {OPTIONS!r}, progress=False)
        qbackend.save_pretrained(model, {str(out)!r})
        real = safetensors.torch.save_file
        calls = []
        def save_then_die(*a, **k):
            real(*a, **k)
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        safetensors.torch.save_file = save_then_die
        qbackend.save_pretrained(model, {str(out)!r}, max_shard_size="40KB")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the killed writer's staged copy
    qbackend.from_pretrained(out, progress=False)
    qbackend.save_pretrained(qbackend.from_pretrained(out, progress=False), out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("size", "want"), [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29),
                                            (4096, 4096)])  # fmt: skip
def test_parse_size(size, want):
    assert save_module.parse_size(size) == want


@pytest.mark.parametrize("size", ["big", 0, -1, "0GB"])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        save_module.parse_size(size)


def test_not_a_transformers_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(CheckpointError, match="needs a transformers model .* use qbackend.save"):
        qbackend.save_pretrained(model, tmp_path / "x", options=OPTIONS)
