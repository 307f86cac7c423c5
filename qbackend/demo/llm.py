"""The demo's LLM row: greedy decoding of a small random-weight Llama, fp32 eager vs qbackend's quantized modules.

Batch-1 decoding reads every weight once per token: on a CPU it is bound by memory bandwidth, so
fewer bytes per weight is where quantization pays. The model is ``transformers.LlamaForCausalLM``
from a config (hidden 512, 8 layers, 8 heads / 2 KV heads, intermediate 1408, vocab 8000: ~27M
parameters, 107 MB in fp32, above a typical L3), random weights from a fixed seed (no download).
The quantized rows are ``qbackend.quantize_(copy, preset)`` run eagerly (no compile: seconds to set
up). Agreement: the cosine of the next-token logits after the prompt against fp32's (greedy tokens
are no measure on random weights, whose top logits are nearly tied).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

LLM_DIMS: dict[str, int] = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                                num_key_value_heads=2, num_hidden_layers=8, vocab_size=8000)  # fmt: skip
LLM_PRESETS: tuple[str, ...] = ("nf4", "int8")


@dataclass
class LLMRow:
    name: str  # "fp32 eager", "qbackend nf4 (quantize_, eager)"
    weights_mb: float  # parameters and buffers the model holds
    tokens_per_s: float
    speedup: float = 1.0  # over fp32 eager
    logits_cosine: float = 1.0  # next-token logits after the prompt vs fp32's
    kernel_copies_mb: float = 0.0  # kernel-layout weight copies made on first use, on top of weights_mb


@dataclass
class LLMResult:
    params: int
    prompt: int
    steps: int
    rows: list[LLMRow] = field(default_factory=list)


def build_llm(seed: int = 0, dims: dict[str, int] | None = None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(dims or LLM_DIMS), tie_word_embeddings=False, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(cfg, dtype=torch.float32).eval()


def greedy(model: nn.Module, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Greedy decoding after ``prompt`` ``[1, P]`` (KV cache): (the logits after the prompt, seconds of
    the ``steps - 1`` decode steps after it)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = out.logits[0, -1].float().clone()
        tok = first.argmax(-1).reshape(1, 1)
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        return first, time.perf_counter() - t0


def _mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e6


def run_llm_decode(presets: tuple[str, ...] = LLM_PRESETS, prompt: int = 16, steps: int = 32, repeats: int = 2,
                   dims: dict[str, int] | None = None) -> LLMResult:  # fmt: skip
    """fp32 eager and each preset's quantize_d copy; tokens/s = (steps - 1) / decode time, median of repeats.
    ``dims``: the LlamaConfig sizes (default :data:`LLM_DIMS`)."""
    import logging

    import qbackend

    dims = dims or LLM_DIMS
    base = build_llm(dims=dims)
    ids = torch.randint(3, dims["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(1))
    models: dict[str, nn.Module] = {"fp32 eager": base}
    logging.getLogger("qbackend").setLevel(logging.WARNING)
    for p in presets:
        m = copy.deepcopy(base)
        qbackend.quantize_(m, p)
        models[f"qbackend {p} (quantize_, eager)"] = m
    from ..kernels import cpu

    logits: dict[str, torch.Tensor] = {}
    copies: dict[str, float] = {}
    for name, m in models.items():  # warm-up; every model stays alive, so do the weight copies its layers made
        before = cpu.packed_nbytes()
        logits[name] = greedy(m, ids, 3)[0]
        copies[name] = (cpu.packed_nbytes() - before) / 1e6
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):  # interleaved: a burst of load hits every row alike
        for name, m in models.items():
            times[name].append(greedy(m, ids, steps)[1])
    res = LLMResult(sum(p.numel() for p in base.parameters()), prompt, steps)
    ref = logits["fp32 eager"]
    for name, m in models.items():
        tps = (steps - 1) / statistics.median(times[name])
        cos = float(torch.nn.functional.cosine_similarity(logits[name].double(), ref.double(), dim=0))
        res.rows.append(LLMRow(name, _mb(m), tps, logits_cosine=cos, kernel_copies_mb=copies[name]))
    for r in res.rows:
        r.speedup = r.tokens_per_s / res.rows[0].tokens_per_s
    return res
