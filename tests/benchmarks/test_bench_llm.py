"""benchmarks/bench_llm.py in its smoke mode (a 2-layer Llama, 16 + 4 tokens), qbackend's methods only.

Each method runs in its own subprocess, as in a real run; the test checks the rows (tokens/s,
peak RSS of the timed runs vs the whole process) and the method list. Where llama-cpp-python and
gguf are installed, the F32 GGUF the script writes is checked against transformers' logits (the
"same weights" claim of the llama.cpp rows).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_llm.py"


def _run(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if cache is not None:
        env["QB_BENCH_CACHE"] = str(cache)
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_method_list_covers_the_anchors():
    methods = json.loads(_run("--list-methods").stdout)
    assert methods[0] == "fp32 eager"
    for m in ("bf16 inductor", "qbackend nf4 eager", "qbackend w8a8 compiled", "bnb nf4", "llama.cpp Q4_0",
              "llama.cpp Q4_K", "llama.cpp Q8_0"):  # fmt: skip
        assert m in methods


def test_smoke_qbackend_eager_rows(tmp_path):
    out = tmp_path / "llm.json"
    r = _run("--small", "--only", r"^qbackend nf4 eager$", "--batches", "1,2", "--compute", "fp32", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [x["method"] for x in rows] == ["qbackend nf4 eager"]
    for x in rows:
        assert "error" not in x, x
        assert sorted(x["batches"]) == ["1", "2"]
        for b in x["batches"].values():
            assert b["prefill_tok_s"] > 0 and b["decode_tok_s"] > 0
            assert 0 < b["peak_rss_mb_run"] <= x["peak_rss_mb_process"] + 1
    assert "B=2 decode tok/s" in r.stdout
    assert rows[0]["compute"] == {"fp32": 15}  # --compute reached every quantized layer (2 blocks x 7, lm_head)
    assert "(compute fp32 x15)" in r.stdout


@pytest.mark.skipif(not (importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf")),
                    reason="llama-cpp-python / gguf not installed (benchmarks/setup_peers.sh)")  # fmt: skip
def test_gguf_conversion_matches_transformers(tmp_path):
    res = json.loads(_run("--small", "--check-gguf", cache=tmp_path).stdout.strip().splitlines()[-1])
    assert res["cosine"] > 0.9999, res
