"""qbackend.demo.llm: the demo's small-Llama decode rows, on a tiny config (plumbing, sizes, agreement)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from qbackend.demo.llm import run_llm_decode  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=512)  # fmt: skip


@pytest.mark.auto_compute  # as the demo runs: the int8 layers in their "auto" mode (int16, packed where it can)
def test_decode_rows_fp32_then_presets():
    res = run_llm_decode(("nf4", "int8"), prompt=4, steps=5, repeats=1, dims=TINY)
    assert [r.name for r in res.rows] == ["fp32 eager", "qbackend nf4 (quantize_, eager)",
                                          "qbackend int8 (quantize_, eager)"]  # fmt: skip
    fp32, nf4, int8 = res.rows
    assert fp32.speedup == 1.0 and fp32.logits_cosine == pytest.approx(1.0)
    for r in res.rows:
        assert r.tokens_per_s > 0 and r.speedup == pytest.approx(r.tokens_per_s / fp32.tokens_per_s)
    assert 0.9 < nf4.logits_cosine < int8.logits_cosine < 1.0  # 4-bit error > 8-bit error > 0
    assert nf4.weights_mb < int8.weights_mb < fp32.weights_mb  # the linears' bytes shrink with the format
    assert res.params > 0 and res.steps == 5 and res.prompt == 4
    # memory beside the model: the int8 layers' kernel-layout copies, where this CPU makes them
    from qbackend.kernels.cpu import int16_compute

    assert fp32.kernel_copies_mb == 0 and nf4.kernel_copies_mb == 0
    assert (int8.kernel_copies_mb > 0) == int16_compute.packs()
