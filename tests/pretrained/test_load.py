"""qbackend.from_pretrained on float checkpoints: the same model as transformers' load + quantize_, streamed."""

from __future__ import annotations

import json

import pytest
import torch

import qbackend
from qbackend.core.config import ConfigError
from qbackend.serialization import CheckpointError

transformers = pytest.importorskip("transformers")

OPTIONS = {"format": "nf4", "min_params": 0}


def _reference(directory, options, dtype):
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    qbackend.quantize_(ref, options)
    return ref


@pytest.mark.parametrize(
    "options",
    [OPTIONS, {"format": "int4", "min_params": 0}, {"format": "int8", "min_params": 0, "exclude": ["lm_head"]}],
)
def test_same_model_as_transformers_load_then_quantize(float_dir, tokens, logits, options):
    model = qbackend.from_pretrained(float_dir, options, progress=False)
    ref = _reference(float_dir, options, torch.float16)
    assert torch.equal(logits(model, tokens), logits(ref, tokens))
    qlayers = {n for n, m in model.named_modules() if isinstance(m, qbackend.QuantizedLinear)}
    assert qlayers == {n for n, m in ref.named_modules() if isinstance(m, qbackend.QuantizedLinear)}
    assert len(qlayers) == 2 * 7 + ("lm_head" not in options.get("exclude", [])) * 1
    # everything else stays in its stored dtype, nothing is left on the meta device
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert not model.training


def test_tied_output_layer_is_quantized_from_the_embedding(tied_dir, tokens, logits):
    model = qbackend.from_pretrained(tied_dir, OPTIONS, progress=False)
    ref = _reference(tied_dir, OPTIONS, torch.float32)
    assert isinstance(model.lm_head, qbackend.QuantizedLinear)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(logits(model, tokens), logits(ref, tokens))


def test_progress_bar_counts_bytes(float_dir, capsys):
    qbackend.from_pretrained(float_dir, OPTIONS, progress=True)
    err = capsys.readouterr().err
    assert "loading llama-fp16" in err and "B/s" in err


def test_hub_id_not_in_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache; qbackend does not download"):
        qbackend.from_pretrained("someone/no-such-model", OPTIONS)
    with pytest.raises(CheckpointError, match="no such directory"):
        qbackend.from_pretrained(tmp_path / "absent", OPTIONS)


def test_hub_id_found_in_the_local_cache(float_dir, monkeypatch, tmp_path, tokens, logits):
    """A snapshot laid out as huggingface_hub caches it loads by its id, offline."""
    snapshot = tmp_path / "models--me--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in float_dir.iterdir():
        (snapshot / f.name).symlink_to(f)
    (tmp_path / "models--me--tiny" / "refs").mkdir()
    (tmp_path / "models--me--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = qbackend.from_pretrained("me/tiny", OPTIONS, progress=False)
    ref = qbackend.from_pretrained(float_dir, OPTIONS, progress=False)
    assert torch.equal(logits(model, tokens), logits(ref, tokens))


def test_options_that_cannot_stream_are_refused(float_dir):
    with pytest.raises(ConfigError, match="load the float model and call qbackend.quantize_"):
        qbackend.from_pretrained(float_dir, "w8a8")


def test_generation_config_is_read(float_dir, copy_dir):
    d = copy_dir(float_dir)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "max_new_tokens": 17, "eos_token_id": 5}))
    model = qbackend.from_pretrained(d, OPTIONS, progress=False)
    assert model.generation_config.max_new_tokens == 17 and model.generation_config.eos_token_id == 5


def test_config_json_dtype_is_kept_for_non_linear_tensors(float_dir):
    cfg = json.loads((float_dir / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"
    model = qbackend.from_pretrained(float_dir, OPTIONS, progress=False)
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n} == {torch.float16}
