"""benchmarks/bench_llama_decode.py on a tiny random Llama (2 layers, hidden 64), CPU, a few decode steps.

Checks the plumbing (rows, fields, compile counts, no recompiles while timing) and that qbackend's
greedy tokens / logits agree with the float model. The compiled path is one qbackend compile; the
memory-saving form (quantize_) runs eagerly here to keep the test short.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_llama_decode.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_llama_decode", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


B = _bench()


def test_method_list_puts_the_float_eager_reference_first():
    methods = B.method_list(torch.device("cpu"), ["nf4"], B.FORMS, [False])
    assert methods[0].name == "fp32 eager" and not methods[0].compiled
    names = [m.name for m in methods]
    assert names == ["fp32 eager", "bf16 eager", "fp32 inductor", "bf16 inductor", "qbackend nf4",
                     "quantize_ nf4 + qbackend"]  # fmt: skip
    cuda = B.method_list(torch.device("cuda"), ["int8"], B.FORMS, [False, True])
    assert [m.name for m in cuda][:2] == ["bf16 eager", "bf16 inductor"]
    assert [m.graphs for m in cuda if m.name.endswith("+graphs")] == [True] * 3


def test_prompt_columns_have_the_strides_of_the_argmax_they_alternate_with():
    ids = torch.arange(12).view(3, 4)
    cols = B.columns(ids)
    argmax = torch.randn(3, 1, 7)[:, -1].argmax(-1, keepdim=True)
    assert [c.stride() for c in cols] == [argmax.stride()] * 4  # else each prompt step would recompile
    assert torch.equal(torch.cat(cols, dim=1), ids)


@pytest.mark.slow
def test_tiny_llama_decode_rows_and_agreement():
    cfg = B.llama_config("tiny")
    fp32 = torch.float32
    methods = [
        B.Method("fp32 eager", fp32, compiled=False),
        B.Method("qbackend int8", fp32, compiled=True, preset="int8"),
        B.Method("quantize_ nf4 eager", fp32, compiled=False, preset="nf4", swap=True),
    ]
    torch._dynamo.reset()
    rows = B.run(cfg, methods, [2], prompt_len=4, steps=3, repeats=1, device="cpu", keep=2,
                 options={"min_params": 0})  # fmt: skip
    assert [(r.batch, r.method) for r in rows] == [(2, m.name) for m in methods]
    ref, int8, nf4 = rows
    for r in rows:
        assert r.note == "", r.note
        assert r.tokens_per_s > 0 and r.ms_per_step > 0 and r.setup_s > 0
        assert r.recompiles_timed == 0  # static cache: the timed steps reuse the warm-up's graph
        assert len(r.logits_cos) == 2
    assert (ref.greedy_match, ref.top1, ref.logits_cos_min) == (1.0, 1.0, pytest.approx(1.0))
    assert ref.vs_eager == 1.0 and ref.compiles_warmup == 0
    assert (int8.form, int8.compiles_warmup, int8.graph_breaks) == ("qbackend", 1, 0)
    assert int8.top1 == 1.0 and int8.logits_cos_min > 0.999
    assert nf4.form == "quantize_" and nf4.compiles_warmup == 0
    # NF4 on hidden 64: logits cosine ~0.987 (measured); a random model's top logits are near ties, so
    # top-1 agreement is coarse here (4 of 8 measured; chance is 1 in 512).
    assert nf4.logits_cos_min > 0.97 and nf4.top1 >= 0.25
    assert nf4.module_mb < ref.module_mb  # the float weights of the linears are gone
    json.dumps([asdict(r) for r in rows])  # what --out writes
    table = B.markdown(rows)
    assert all(m.name in table for m in methods)
