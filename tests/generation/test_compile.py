"""qbackend.generation.compile_for_generation: greedy generate() of a qbackend-compiled Llama with a static
KV cache gives the eager quantized model's tokens over 64 new tokens, with two compiles in all (prefill and
decode: none per position, none per new prompt length within the cache).

Compile counts are read from ``torch._dynamo.utils.counters`` and, after the first call, pinned by
``torch._dynamo.config.error_on_recompile`` (a recompile raises).
"""

from __future__ import annotations

import inspect

import pytest
import torch

import qbackend
from qbackend.generation import compile_for_generation, uncompile_generation

NEW_TOKENS = 64
STATIC = dict(cache_implementation="static", max_cache_len=128)  # what an uncompiled model is given


def _generate(model, ids, **kw):
    out = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True,
                         output_logits=True, **kw)  # fmt: skip
    return out.sequences, torch.stack(out.logits)


def _assert_same_generation(compiled, eager, float_model, ids, **eager_kw):
    tokens, logits = _generate(compiled, ids)
    ref_tokens, ref_logits = _generate(eager, ids, **STATIC)
    assert tokens.shape == (1, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(tokens, ref_tokens), f"first difference at new token {_first_diff(tokens, ref_tokens, ids)}"
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    # the compiled graphs ran the quantized weights, not the float ones
    float_logits = _generate(float_model, ids, **STATIC)[1] if float_model is not None else None
    if float_logits is not None:
        assert (logits[0] - float_logits[0]).abs().max() > 1e-3


def _first_diff(a, b, ids):
    diff = (a != b).nonzero()
    return int(diff[0, 1]) - ids.shape[1] if len(diff) else None


@pytest.mark.parametrize("preset", ["nf4", pytest.param("int4", marks=pytest.mark.slow),
                                    pytest.param("int8", marks=pytest.mark.slow)])  # fmt: skip
def test_compiled_generate_matches_eager_quantized_with_two_compiles(
    causal_lm, quantized_lm, quant_options, prompt, fresh_dynamo, preset
):
    counters = fresh_dynamo
    float_model = causal_lm()
    model = compile_for_generation(causal_lm(), quant_options(preset), max_cache_len=128)
    eager = quantized_lm(preset)

    _assert_same_generation(model, eager, float_model, prompt(12))
    assert counters["stats"]["unique_graphs"] == 2  # prefill + decode, over 64 positions
    assert counters["frames"]["ok"] == 2
    assert not counters["graph_break"], dict(counters["graph_break"])

    with torch._dynamo.config.patch(error_on_recompile=True):  # new prompt lengths within the cache
        for length in (5, 31):
            _assert_same_generation(model, eager, None, prompt(length))
    assert counters["stats"]["unique_graphs"] == 2

    changed = causal_lm()
    with torch.no_grad():
        changed.lm_head.weight.mul_(-1.0)
    qbackend.quantize_(changed, quant_options(preset))
    _check_weight_change_is_requantized(model, changed, prompt(8))


def test_module_form_then_compiled_forward(quantized_lm, prompt, fresh_dynamo):
    """quantize_ (float weights freed), then the forward compiled as transformers documents it."""
    counters = fresh_dynamo
    eager = quantized_lm("nf4")
    model = quantized_lm("nf4")
    assert isinstance(model.model.layers[0].mlp.down_proj, qbackend.QuantizedLinear)
    model.forward = torch.compile(model.forward, backend="qbackend")
    ids = prompt(9)
    tokens = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, **STATIC)
    assert torch.equal(tokens, eager.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, **STATIC))
    assert counters["stats"]["unique_graphs"] == 2
    with torch._dynamo.config.patch(error_on_recompile=True):  # the same prompt length again: same graphs
        other = prompt(9).flip(1)
        assert torch.equal(_generate(model, other, **STATIC)[0], _generate(eager, other, **STATIC)[0])


def _check_weight_change_is_requantized(model, changed, ids):
    """The per-call weight check runs in the decode loop: an in-place update between two generate() calls
    is re-quantized before the next one (no stale tokens), with no recompile."""
    before = model.generate(ids, do_sample=False, max_new_tokens=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # reverses the ranking of every logit (``changed`` holds the same)
    with torch._dynamo.config.patch(error_on_recompile=True):
        after = model.generate(ids, do_sample=False, max_new_tokens=16)
    assert torch.equal(after, changed.generate(ids, do_sample=False, max_new_tokens=16, **STATIC))
    assert not torch.equal(after, before)


def test_settings_and_undo(causal_lm):
    model = causal_lm()
    wrapped = torch.compile(model, backend="qbackend")  # generate() of this wrapper would run the float model
    assert compile_for_generation(wrapped, "int8", max_cache_len=4096) is model
    cfg = model.generation_config
    assert cfg.cache_implementation == "static" and cfg.disable_compile
    assert cfg.max_cache_len == 160  # capped by max_position_embeddings
    assert "input_ids" in inspect.signature(model.forward).parameters
    assert "forward" in model.__dict__
    assert uncompile_generation(model) is model and "forward" not in model.__dict__
    compile_for_generation(model, "nf4")
    compile_for_generation(model, "int8")  # twice: the first forward is still the one restored
    uncompile_generation(model)
    assert "forward" not in model.__dict__


def test_bad_input(causal_lm):
    with pytest.raises(TypeError, match=r"Linear has no generate\(\)"):
        compile_for_generation(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="max_cache_len=1"):
        compile_for_generation(causal_lm(), max_cache_len=1)


@pytest.mark.parametrize("saved_by", ["transformers", pytest.param("qbackend", marks=pytest.mark.slow)])
def test_generate_of_a_model_loaded_by_from_pretrained(causal_lm, quantized_lm, quant_options, prompt, fresh_dynamo,
                                                       tmp_path, saved_by):  # fmt: skip
    """A Hugging Face directory read by ``qbackend.from_pretrained`` (a float checkpoint quantized while
    loading, or a qbackend directory loaded as stored) generates the eager quantized model's tokens with
    two compiles."""
    counters = fresh_dynamo
    float_dir = tmp_path / "float"
    causal_lm().save_pretrained(float_dir)
    loaded = qbackend.from_pretrained(float_dir, quant_options("nf4"), progress=False)
    if saved_by == "qbackend":
        qbackend.save_pretrained(loaded, tmp_path / "nf4")
        loaded = qbackend.from_pretrained(tmp_path / "nf4", progress=False)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, qbackend.QuantizedLinear)
    model = compile_for_generation(loaded, max_cache_len=128)
    _assert_same_generation(model, quantized_lm("nf4"), causal_lm(), prompt(12))
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"], dict(counters["graph_break"])
