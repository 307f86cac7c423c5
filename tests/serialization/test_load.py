"""qbackend.save / qbackend.load: round trips, no re-quantization, bitsandbytes checkpoints, clear errors."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import qbackend
import qbackend.formats.qweight
from qbackend import QuantConfig
from qbackend.serialization import CheckpointError, load, save
from qbackend.serialization.manifest import seal


class Net(nn.Module):
    """Linears of two sizes (one too small to quantize by default), a LayerNorm, tied linears, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(72, 256)
        self.down = nn.Linear(256, 72, bias=False)
        self.tied = nn.Linear(72, 256)
        self.tied.weight = self.up.weight
        self.small = nn.Linear(72, 8)
        self.norm = nn.LayerNorm(72)
        self.register_buffer("offset", torch.linspace(-1, 1, 72), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x)) + self.tied(x)
        y = self.norm(self.down(h) + self.offset)
        return torch.cat([y, self.small(y)], dim=-1)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 72, generator=torch.Generator().manual_seed(1))


def _quantized(preset: str) -> Net:
    torch.manual_seed(0)
    m = Net().eval()
    qbackend.quantize_(m, {"preset": preset, "min_params": 4096})
    return m


@pytest.mark.parametrize("preset", ["nf4", "int4", "int8"])
def test_round_trip_from_a_meta_skeleton(tmp_path, x, preset, no_quantize):
    m = _quantized(preset)
    expected = m(x)
    path = save(m, tmp_path / "net.safetensors")
    no_quantize()
    loaded = load(path, Net)  # built on the meta device: no float weight is ever allocated
    assert isinstance(loaded.up, qbackend.QuantizedLinear) and isinstance(loaded.down, qbackend.QuantizedLinear)
    assert isinstance(loaded.small, nn.Linear)  # below min_params: stays float
    assert loaded.up.codes is loaded.tied.codes  # tied weights share one set of quantized tensors
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert not any(isinstance(p, nn.Parameter) and p.shape == (256, 72) for p in loaded.parameters())
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    if preset == "nf4":
        assert loaded.up.nested_codes.dtype == torch.uint8  # nested constants stored as they are


def test_checkpoint_layout(tmp_path):
    from safetensors import safe_open

    path = save(_quantized("nf4"), tmp_path / "net.safetensors")
    with safe_open(str(path), "pt") as st:
        keys = set(st.keys())
        manifest = json.loads(st.metadata()["qbackend"])
    assert manifest["format_version"] == qbackend.serialization.FORMAT_VERSION
    up = manifest["layers"]["up"]
    assert up["kind"] == "weight_only" and "op" not in up  # a format record, no kernel op
    assert manifest["config"] is None  # quantized before save: the layers' schemes say it all
    assert up["weight"]["scheme"]["nested"] is True and up["weight"]["scheme"]["version"] == 1
    assert "up.weight" not in keys and "up.codes" in keys and "up.nested_absmax" in keys
    assert manifest["layers"]["tied"]["weight"]["tensors"]["codes"] == "up.codes"  # stored once
    assert "offset" in keys  # non-persistent buffers too: a meta skeleton needs them
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_a_compiled_float_model_is_saved_with_its_compile_options(tmp_path, x):
    torch.manual_seed(0)
    m = Net().eval()
    compiled = torch.compile(m, backend="qbackend", options={"preset": "int8", "min_params": 0})
    path = save(compiled, tmp_path / "net.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as st:
        assert json.loads(st.metadata()["qbackend"])["config"]["format"] == "int8"
    assert qbackend.serialization.load_config(path) == QuantConfig.from_options({"preset": "int8", "min_params": 0})
    assert isinstance(m.up, nn.Linear)  # the user's model keeps its float layers
    loaded = load(path, Net)
    assert isinstance(loaded.small, qbackend.QuantizedLinear)  # min_params=0 from the compile options
    assert loaded.up.scheme.name == "int8-sym-ch0"
    ref = Net().eval()
    ref.load_state_dict(m.state_dict())
    qbackend.quantize_(ref, {"preset": "int8", "min_params": 0})
    torch.testing.assert_close(loaded(x), ref(x), rtol=0, atol=0)


def test_transformers_model_loads_without_code(tmp_path, no_quantize):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2,
                                  vocab_size=120, max_position_embeddings=32)  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    qbackend.quantize_(model, {"preset": "nf4", "min_params": 0})
    ids = torch.randint(0, 120, (2, 9))
    expected = model(input_ids=ids).last_hidden_state
    path = save(model, tmp_path / "bert.safetensors")
    no_quantize()
    loaded = load(path)  # rebuilt from the stored transformers config, on the meta device
    assert type(loaded).__name__ == "BertModel"
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, expected, rtol=0, atol=0)


def test_bitsandbytes_nf4_checkpoint_loads(tmp_path, x, no_quantize):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(72, 256), nn.ReLU(), nn.Linear(256, 40))

    def linear4(i: int, o: int) -> nn.Module:
        return bnb.nn.Linear4bit(i, o, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)

    q = nn.Sequential(linear4(72, 256), nn.ReLU(), linear4(256, 40))
    q.load_state_dict(float_model.state_dict())
    q = q.to("cpu")  # bitsandbytes quantizes on the move
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, tmp_path / "qlora.safetensors")
    no_quantize()
    skeleton = lambda: nn.Sequential(nn.Linear(72, 256), nn.ReLU(), nn.Linear(256, 40))  # noqa: E731
    loaded = load(tmp_path / "qlora.safetensors", skeleton)
    assert isinstance(loaded[0], qbackend.QuantizedLinear) and loaded[0].scheme.nested
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), rtol=1e-4, atol=1e-4)


# ---- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    return save(_quantized("nf4"), tmp_path / "net.safetensors")


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"net.safetensors: not a readable safetensors file .*truncated"):
        load(saved, Net)


def test_corrupt_tensor_bytes(saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint: tensor '.*' does not match its checksum"):
        load(saved, Net)


def _rewrite_manifest(path: Path, **changes) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["qbackend"])
    manifest.update(changes)
    header["__metadata__"].update(seal(manifest))
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_newer_format_version(saved):
    _rewrite_manifest(saved, format_version=99, qbackend_version="9.0")
    with pytest.raises(CheckpointError, match=r"written by qbackend 9.0 in checkpoint format 99; .* upgrade qbackend"):
        load(saved, Net)


def test_not_a_checkpoint(tmp_path):
    save_file({"w": torch.zeros(3)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a qbackend checkpoint .* and not a bitsandbytes 4-bit checkpoint"):
        load(tmp_path / "plain.safetensors", Net)


def test_wrong_model(saved):
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(72, 256)
            self.norm = nn.LayerNorm(100)

    with pytest.raises(CheckpointError, match=r"the model has no 'down', 'tied', 'offset' and 2 more \(5 in all\)"):
        load(saved, Other)


def test_missing_file_and_no_model(tmp_path, saved):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file or directory"):
        load(tmp_path / "nope.safetensors")
    # the class is named by its module, which pytest names after the file's path under the rootdir
    with pytest.raises(
        CheckpointError, match=r"holds [\w.]*\btest_load\.Net, which cannot be rebuilt from the file alone; pass"
    ):
        load(saved)


def test_a_failed_save_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    import safetensors.torch

    path = save(_quantized("nf4"), tmp_path / "net.safetensors")
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save(_quantized("int8"), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.safetensors"]


def test_checkpoint_keeps_the_requested_compute_and_load_resolves_it(cpu_compute, tmp_path, caplog):
    def make():
        return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40))

    torch.manual_seed(0)
    path = save(make(), tmp_path / "m.safetensors", preset="nf4", min_params=0, compute="int8")
    assert qbackend.serialization.load_config(path).compute == "int8"
    loaded = load(path, model=make)
    assert (loaded[0].compute_option, loaded[0].compute) == ("int8", "int8")
    again = load(path, model=make, compute="fp32")
    assert again[2].compute == "fp32"
    for a, b in zip(loaded[0].buffers(), again[0].buffers(), strict=True):  # the same canonical weights
        assert torch.equal(a, b)
    cpu_compute(features=("avx2",))  # a machine without VNNI: the saved "int8" becomes "auto", asked for it raises
    with caplog.at_level(logging.WARNING, logger="qbackend"):
        assert load(path, model=make)[0].compute_option == "auto"
    assert "compute='int8' needs AVX512-VNNI" in caplog.text
    with pytest.raises(ValueError, match="compute='int8' needs AVX512-VNNI"):
        load(path, model=make, compute="int8")
