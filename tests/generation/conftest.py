"""The causal LM the generation tests decode with: a seeded random-weight Llama built from a small
config (no download; one layer keeps each torch.compile to seconds).

``causal_lm()`` returns a fresh float model each call, so each test quantizes or compiles its own
copy; ``quantized_lm(preset)`` the same model quantized in its module form (the eager reference and
the module-form input of the tests). Another source of the model (e.g. a checkpoint directory read
by a loader that quantizes while loading) can be added as a parametrisation of these fixtures.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

LLAMA_DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=1, vocab_size=256, max_position_embeddings=160)  # fmt: skip


@pytest.fixture(scope="session")
def _seeded_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA_DIMS, tie_word_embeddings=False, pad_token_id=0, eos_token_id=None)
    return LlamaForCausalLM._from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture
def causal_lm(_seeded_llama):
    """``causal_lm()``: a fresh float copy of the seeded Llama."""
    return lambda: copy.deepcopy(_seeded_llama)


@pytest.fixture
def quant_options():
    """``quant_options(preset)``: the options every test quantizes with (all linears, however small)."""
    return lambda preset: {"preset": preset, "min_params": 0}


@pytest.fixture
def quantized_lm(causal_lm, quant_options):
    """``quantized_lm(preset)``: a fresh copy with its linears swapped by ``qbackend.quantize_``."""
    import qbackend

    def make(preset: str) -> torch.nn.Module:
        model = causal_lm()
        qbackend.quantize_(model, quant_options(preset))
        return model

    return make


@pytest.fixture
def prompt():
    """``prompt(length)``: a batch-1 prompt of random token ids, the same for a given length."""
    vocab = LLAMA_DIMS["vocab_size"]
    return lambda length: torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after the test (compile counts start at 0)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()
