"""The group-linears pass: weight-only linears reading one input at decode -> one ``qbackend::linear_group``
call, every output bit-identical; everything else untouched."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from qbackend.core.config import QuantConfig
from qbackend.kernels.cpu import int8_compute, int16_compute
from qbackend.passes.group_linears import MAX_ROWS, group_linears
from qbackend.testing import capture_graph
from qbackend.workflows.weight_only import QuantizedLinear

GROUP = torch.ops.qbackend.linear_group.default
VNNI = int8_compute._lib() is not None
needs_group_kernel = pytest.mark.skipif(not VNNI, reason="no CPU group kernel (int8 compute: AVX512-VNNI)")


def _q(n: int, k: int, bias: bool, seed: int, fmt: str = "nf4", compute: str = "int8") -> QuantizedLinear:
    torch.manual_seed(seed)
    w, b = torch.randn(n, k) * 0.05, (torch.randn(n) if bias else None)
    return QuantizedLinear.from_weight(w, b, QuantConfig(format=fmt).scheme, compute=compute if VNNI else "fp32")


class Block(torch.nn.Module):
    """q/k/v on one input (k with a bias), then gate/up on another, down alone: two groups."""

    def __init__(self, d: int = 64, h: int = 96, compute: str = "int8") -> None:
        super().__init__()
        self.q, self.k, self.v = (
            _q(d, d, False, 0, compute=compute),
            _q(32, d, True, 1, compute=compute),
            _q(32, d, False, 2, compute=compute),
        )
        self.gate, self.up = _q(h, d, False, 3, compute=compute), _q(h, d, False, 4, compute=compute)
        self.down = _q(d, h, False, 5, compute=compute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.q(x) * 2 + torch.cat([self.k(x), self.v(x)], -1)
        a = a.view(*a.shape[:-1], 4, 16).transpose(-1, -2).reshape(a.shape) + x
        return self.down(torch.nn.functional.silu(self.gate(a)) * self.up(a)) + a


def _groups(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is GROUP]


def _linears(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "nf4_linear" in str(n.target))


@needs_group_kernel
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (2, 3, 64), (MAX_ROWS, 64)])
def test_groups_same_input_linears_bit_identically(shape):
    m = Block().eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        want = m(x)
        g = capture_graph(m, x)
        assert group_linears(g.gm) == 5
        assert len(_groups(g.gm)) == 2 and _linears(g.gm) == 1
        (got,) = g.gm(*g.example_inputs)
    # The linears' outputs are bit-identical (above, and tests/kernels/test_linear_group.py); Inductor fuses the
    # pointwise code around them differently (e.g. q's and k's rotary embedding in one kernel), which may round
    # the last bit of a few values differently.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_leaves_prefill_grad_and_graph_outputs_alone():
    m = Block().eval()
    with torch.no_grad():
        g = capture_graph(m, torch.randn(MAX_ROWS + 1, 64))  # prefill: many rows
        assert group_linears(g.gm) == 0 and _linears(g.gm) == 6
    g = capture_graph(m, torch.randn(1, 64, requires_grad=True))  # a gradient flows through the outputs
    assert group_linears(g.gm) == 0
    with torch.no_grad():
        g = capture_graph(lambda x: (m.q(x), m.gate(x)), torch.randn(1, 64))  # returned as they are
        assert group_linears(g.gm) == 0
        g = capture_graph(lambda x, y: m.k(x) + m.v(y), torch.randn(1, 64), torch.randn(1, 64))  # other inputs
        assert group_linears(g.gm) == 0
        g = capture_graph(Block(compute="fp32").eval(), torch.randn(1, 64))  # no group kernel: copies only
        assert group_linears(g.gm) == 0


@needs_group_kernel
@pytest.mark.parametrize(("preset", "compute"), [("nf4", "int8"), ("int8", "int16")])
def test_llama_decode_under_the_backend_matches(preset, compute):
    """A small Llama with a static cache: each decode layer's q/k/v and gate/up become groups (nf4 in int8
    compute, int8 weights in int16 compute on their packed copies); the logits equal those compiled
    without the pass."""
    if compute == "int16" and not int16_compute.packs():
        pytest.skip("int16 compute runs no packed kernels here (AVX512-VNNI)")
    transformers = pytest.importorskip("transformers")
    import qbackend
    import qbackend.core.backend as backend_mod

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    qbackend.quantize_(model, {"preset": preset, "compute": compute, "min_params": 0})
    cache = transformers.StaticCache(config=cfg, max_cache_len=24)
    prompt = torch.randint(3, 128, (1, 12))
    counts: list[int] = []
    real = backend_mod.group_linears

    def recording(gm):
        counts.append(real(gm))
        return counts[-1]

    def run(off: bool):
        backend_mod.group_linears = (lambda gm: 0) if off else recording
        try:
            torch._dynamo.reset()
            fn = torch.compile(model, backend="qbackend", dynamic=False)
            cache.reset()
            out = []
            with torch.no_grad():
                fn(input_ids=prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(12))
                for i, tok in enumerate((5, 9, 77)):
                    pos = torch.tensor([12 + i])
                    out.append(fn(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                                  cache_position=pos).logits)  # fmt: skip
            return torch.cat(out)
        finally:
            backend_mod.group_linears = real

    want, got = run(off=True), run(off=False)
    assert sorted(counts) == [0, 5 * cfg.num_hidden_layers]  # prefill: none; decode: q/k/v and gate/up per layer
    # The linears' outputs are bit-identical (above, and tests/kernels/test_linear_group.py); Inductor fuses the
    # pointwise code around them differently (e.g. q's and k's rotary embedding in one kernel), which may round
    # the last bit of a few values differently. A compile after the first also rounds the prefill attention's
    # last bits differently (with or without the pass); int16 activations are fine enough to carry that
    # (a level of x is 1/32767 of its row's largest value) where int8 ones absorb it.
    tol = 1e-6 if compute == "int8" else 3e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
