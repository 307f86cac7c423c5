"""The decode-attention pass: eligible CPU SDPA calls -> ``qbackend::decode_attention``, nothing else touched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from qbackend.passes.decode_attention import MAX_Q_LEN, use_decode_attention
from qbackend.passes.grouped_kv import use_grouped_kv
from qbackend.testing import capture_graph

OP = torch.ops.qbackend.decode_attention.default


def _capture(fn, *args):
    """The Dynamo graph of ``fn`` (with example values in node.meta) and the inputs it takes."""
    g = capture_graph(fn, *args)
    return g.gm, g.example_inputs


def _ops(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]


def _sdpas(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]


def _repeat(x: torch.Tensor, n_rep: int) -> torch.Tensor:  # transformers' repeat_kv
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("form", ["enable_gqa", "repeated", "same_heads"])
@pytest.mark.parametrize("q_len", [1, 4])
def test_rewrites_decode_attention_exactly(mask, form, q_len):
    torch.manual_seed(0)
    q = torch.randn(2, q_len, 8, 16).transpose(1, 2)
    cache_k, cache_v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    keep = torch.ones(2, 1, q_len, 40, dtype=torch.bool)
    keep[..., 30:] = False
    m = {"none": None, "bool": keep, "float": torch.zeros(keep.shape).masked_fill(~keep, float("-inf")),
         "causal": None}[mask]  # fmt: skip

    def attn(q, k, v, m):
        kw = {"attn_mask": m, "is_causal": mask == "causal", "scale": 0.2}
        if form == "enable_gqa":
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        if form == "repeated":
            return F.scaled_dot_product_attention(q, _repeat(k, 4), _repeat(v, 4), **kw)
        return F.scaled_dot_product_attention(q[:, :2], k, v, **kw)

    gm, inputs = _capture(attn, q, cache_k, cache_v, m)
    want = gm(*inputs)
    use_grouped_kv(gm)
    assert use_decode_attention(gm) == 1
    (call,) = _ops(gm)
    assert not _sdpas(gm)
    assert call.kwargs["scale"] == 0.2 and call.kwargs["is_causal"] == (mask == "causal")
    # after grouped_kv the op reads the cache's own K/V heads (no repeat left in the graph)
    assert call.args[1].meta["example_value"].shape[1] == 2
    torch.testing.assert_close(gm(*inputs), want, rtol=1e-5, atol=1e-6)


def test_leaves_other_attention_alone():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    long_q = torch.randn(1, 4, MAX_Q_LEN + 1, 8)

    def attn(q, k, v, long_q):
        prefill = F.scaled_dot_product_attention(long_q, k, v)  # too many query positions
        dropout = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        double = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        half = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        three_d = F.scaled_dot_product_attention(q[0], k[0], v[0])
        return prefill.sum() + dropout.sum() + double.sum() + half.sum() + three_d.sum()

    gm, _ = _capture(attn, q, k, v, long_q)
    before = str(gm.graph)
    assert use_decode_attention(gm) == 0
    assert str(gm.graph) == before and len(_sdpas(gm)) == 5


def test_leaves_attention_that_needs_grad_alone():
    q = torch.randn(1, 4, 1, 8, requires_grad=True)
    k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    gm, _ = _capture(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    assert use_decode_attention(gm) == 0
    assert len(_sdpas(gm)) == 1


def test_compiled_function_runs_the_kernel():
    """Under the backend (no linears): the op runs in Inductor's code and equals sdpa."""
    import qbackend  # noqa: F401  (registers the backend)

    torch.manual_seed(2)
    q, k, v = torch.randn(2, 1, 8, 64).transpose(1, 2), torch.randn(2, 2, 100, 64), torch.randn(2, 2, 100, 64)
    mask = torch.rand(2, 1, 1, 100) > 0.2

    def attn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2).reshape(2, -1)

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(attn, backend="qbackend", dynamic=False)(q, k, v, mask)
    torch.testing.assert_close(got, attn(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_static_cache_llama_decode_under_the_backend():
    """A GQA Llama with a static cache: each layer's decode attention becomes the op, reading the cache's
    K/V heads in place (grouped_kv ran first); the prefill (more query positions) keeps sdpa; the logits
    equal the eager quantized model's."""
    transformers = pytest.importorskip("transformers")
    import qbackend
    import qbackend.core.backend as backend_mod

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    graphs: list[tuple[int, fx.GraphModule]] = []
    real = backend_mod.use_decode_attention

    def recording(gm):
        graphs.append((real(gm), gm))
        return graphs[-1][0]

    cache = transformers.StaticCache(config=cfg, max_cache_len=24)
    n_prompt = MAX_Q_LEN + 2
    prompt, step = torch.randint(3, 128, (1, n_prompt)), torch.tensor([[9]])

    def run(fn):
        cache.reset()
        with torch.no_grad():
            fn(input_ids=prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(n_prompt))
            pos = torch.tensor([n_prompt])
            return fn(input_ids=step, past_key_values=cache, use_cache=True, cache_position=pos).logits

    backend_mod.use_decode_attention = recording
    try:
        torch._dynamo.reset()
        opts = {"preset": "int8", "compute": "fp32"}
        got = run(torch.compile(model, backend="qbackend", options=opts, dynamic=False))
    finally:
        backend_mod.use_decode_attention = real
    counts = sorted(n for n, _ in graphs)
    assert counts == [0, cfg.num_hidden_layers]  # prefill: none; decode: one per layer
    (decode,) = [gm for n, gm in graphs if n]
    for call in _ops(decode):
        assert call.args[0].meta["example_value"].shape[2] == 1
        assert call.args[1].meta["example_value"].shape[1] == cfg.num_key_value_heads
        assert call.kwargs["attn_mask"] is not None
    qbackend.quantize_(model, {"preset": "int8", "compute": "fp32"})
    torch.testing.assert_close(got, run(model), rtol=1e-4, atol=1e-4)
