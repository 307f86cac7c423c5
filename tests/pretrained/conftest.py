"""Tiny random Llama checkpoints written by transformers, shared by the tests of qbackend.pretrained."""

from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 256


def tiny_llama(tie: bool = False, dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


@pytest.fixture(scope="session")
def float_dir(tmp_path_factory):
    """A float16 Llama directory as transformers writes it (untied; two shards with an index)."""
    d = tmp_path_factory.mktemp("pretrained") / "llama-fp16"
    tiny_llama().save_pretrained(d, max_shard_size="300KB")
    return d


@pytest.fixture(scope="session")
def tied_dir(tmp_path_factory):
    """A float32 Llama with the output layer tied to the embedding (lm_head.weight not stored)."""
    d = tmp_path_factory.mktemp("pretrained") / "llama-tied"
    tiny_llama(tie=True, dtype=torch.float32, seed=1).save_pretrained(d)
    return d


@pytest.fixture
def copy_dir(tmp_path):
    """``copy_dir(src)``: a copy of the directory ``src`` under tmp_path."""

    def copy(src, name="m"):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture
def make_llama():
    """``make_llama(tie=False, dtype=torch.float16, seed=0)``: a tiny random Llama."""
    return tiny_llama


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def logits():
    def run(model, x):
        with torch.no_grad():
            return model(x).logits

    return run
