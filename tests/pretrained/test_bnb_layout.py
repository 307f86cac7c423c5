"""Interop with transformers' bitsandbytes 4-bit serialization, checked against the real libraries on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qbackend
from qbackend.serialization import CheckpointError

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")


def _bnb_config(nested: bool, quant_type: str = "nf4"):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=nested,
                                           bnb_4bit_compute_dtype=torch.float32)  # fmt: skip


def _float_with_weights_of(float_dir, quantized: nn.Module) -> nn.Module:
    """The float checkpoint with each quantized layer's weight replaced by its dequantized weight (fp32)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    for name, m in quantized.named_modules():
        if isinstance(m, qbackend.QuantizedLinear):
            model.get_submodule(name).weight.data = m.dequantized_weight()
    return model


def _bnb_weight(m: nn.Module) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()


@pytest.mark.parametrize(("nested", "quant_type"), [(True, "nf4"), (False, "fp4")])
def test_transformers_bnb_directory_loads_with_the_same_outputs(tmp_path, tokens, logits, nested, quant_type,
                                                                 no_quantize):  # fmt: skip
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "float")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", device_map="cpu", quantization_config=_bnb_config(nested, quant_type)
    )
    ref.save_pretrained(tmp_path / "bnb")
    assert json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    no_quantize()
    model = qbackend.from_pretrained(tmp_path / "bnb", progress=False, compute="fp32")
    layers = [n for n, m in model.named_modules() if isinstance(m, qbackend.QuantizedLinear)]
    assert len(layers) == 14 and isinstance(model.lm_head, nn.Linear)  # transformers keeps lm_head float
    for name in layers:  # the very weights bitsandbytes decodes
        assert torch.equal(model.get_submodule(name).dequantized_weight(), _bnb_weight(ref.get_submodule(name))), name
    ours, theirs = logits(model, tokens), logits(ref, tokens)
    exact = logits(_float_with_weights_of(tmp_path / "float", model), tokens)
    assert (ours - exact).abs().max() < 1e-5  # fp32 path: the outputs of the (shared) dequantized weights
    # bitsandbytes' own CPU kernel adds rounding of its own (~5e-3 here); stay within it
    assert (ours - theirs).abs().max() < 2e-2 * theirs.abs().max()


def test_qbackend_nf4_written_for_transformers_and_peft(float_dir, tmp_path, tokens, logits):
    model = qbackend.from_pretrained(float_dir, {"format": "nf4", "exclude": ["lm_head"]}, progress=False,
                                     compute="fp32")  # fmt: skip
    out = qbackend.save_pretrained(model, tmp_path / "bnb", layout="bitsandbytes")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4" and qc["load_in_4bit"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    layers = [n for n, m in model.named_modules() if isinstance(m, qbackend.QuantizedLinear)]
    assert layers and all(isinstance(loaded.get_submodule(n), bnb.nn.Linear4bit) for n in layers)
    for name in layers:  # transformers holds exactly our codes and constants
        assert torch.equal(_bnb_weight(loaded.get_submodule(name)), model.get_submodule(name).dequantized_weight())
    theirs = logits(loaded, tokens)
    assert (logits(model, tokens) - theirs).abs().max() < 2e-2 * theirs.abs().max()  # bnb's CPU kernel rounding
    # peft puts LoRA adapters on it; with fresh adapters (B = 0) the outputs are unchanged
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(loaded, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert isinstance(lora.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert torch.equal(logits(lora, tokens), logits(loaded, tokens))
    # and qbackend reads its own bitsandbytes directory back
    again = qbackend.from_pretrained(out, progress=False, compute="fp32")
    assert torch.equal(logits(again, tokens), logits(model, tokens))


def test_bitsandbytes_layout_refuses_other_formats(float_dir, tmp_path):
    model = qbackend.from_pretrained(float_dir, {"format": "int4", "min_params": 0}, progress=False)
    with pytest.raises(CheckpointError, match="is int4.*the bitsandbytes layout holds weight-only nf4/fp4"):
        qbackend.save_pretrained(model, tmp_path / "x", layout="bitsandbytes")
    assert not (tmp_path / "x").exists()
