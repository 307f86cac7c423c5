"""The grouped-query attention pass: repeated K/V heads -> SDPA(enable_gqa=True), exact and only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from qbackend.passes.grouped_kv import use_grouped_kv
from qbackend.testing import capture_graph


def _capture(fn, *args):
    """The Dynamo graph of ``fn`` (with example values in node.meta) and the inputs it takes."""
    g = capture_graph(fn, *args)
    return g.gm, g.example_inputs


def _repeat(x: torch.Tensor, n_rep: int) -> torch.Tensor:  # transformers' repeat_kv
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _sdpa_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("form", ["expand", "repeat_interleave"])
def test_rewrites_repeated_heads_exactly(q_len, masked, form):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, q_len, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    mask = torch.zeros(2, 1, q_len, 12)
    mask[..., 9:] = float("-inf")

    def attn(q, k, v, mask):
        rep = _repeat if form == "expand" else (lambda t, r: torch.repeat_interleave(t, r, dim=1))
        return F.scaled_dot_product_attention(q, rep(k, 4), rep(v, 4), attn_mask=mask if masked else None, scale=0.3)

    gm, inputs = _capture(attn, q, k, v, mask)
    want = gm(*inputs)
    assert use_grouped_kv(gm) == 1
    (call,) = _sdpa_calls(gm)
    assert call.kwargs["enable_gqa"] is True and call.kwargs["scale"] == 0.3
    assert not any(n.target in ("expand", "reshape") or n.target is torch.repeat_interleave for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*inputs), want, rtol=1e-6, atol=1e-6)


def test_leaves_other_attention_alone():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)

    def attn(q, k, v):
        plain = F.scaled_dot_product_attention(q, k, k)  # no repeat
        mixed = F.scaled_dot_product_attention(q, k, _repeat(v, 2))  # only V repeated
        uneven = torch.tensor([3, 1])  # per-head counts: 4 heads from 2, but not a uniform repeat
        counted = F.scaled_dot_product_attention(q, torch.repeat_interleave(v, uneven, dim=1, output_size=4),
                                                 torch.repeat_interleave(v, uneven, dim=1, output_size=4))  # fmt: skip
        return plain + mixed + counted

    gm, _ = _capture(attn, q, k, v)
    before = str(gm.graph)
    assert use_grouped_kv(gm) == 0
    assert str(gm.graph) == before


def test_static_cache_llama_under_the_backend():
    """A GQA Llama with a static cache (transformers repeats K/V under Dynamo when there is a mask): the
    backend rewrites each layer's decode attention, and the logits equal the eager quantized model's."""
    transformers = pytest.importorskip("transformers")
    import qbackend

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    seen: list[int] = []
    import qbackend.core.backend as backend_mod

    real = backend_mod.use_grouped_kv

    def counting(gm):
        seen.append(real(gm))
        return seen[-1]

    cache = transformers.StaticCache(config=cfg, max_cache_len=16)
    prompt, step = torch.tensor([[3, 17, 5]]), torch.tensor([[9]])

    def run(fn):
        cache.reset()
        with torch.no_grad():
            fn(input_ids=prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(3))
            return fn(input_ids=step, past_key_values=cache, use_cache=True, cache_position=torch.tensor([3])).logits

    backend_mod.use_grouped_kv = counting
    try:
        torch._dynamo.reset()
        opts = {"preset": "int8", "compute": "fp32"}
        got = run(torch.compile(model, backend="qbackend", options=opts, dynamic=False))
    finally:
        backend_mod.use_grouped_kv = real
    # the decode step has a mask, so transformers repeats K/V there: one rewrite per layer (the static
    # cache's in-place index_copy_ must survive the rewrite, or the logits differ)
    assert sum(seen) == cfg.num_hidden_layers
    qbackend.quantize_(model, {"preset": "int8", "compute": "fp32"})
    torch.testing.assert_close(got, run(model), rtol=1e-4, atol=1e-4)
