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
    r = _run("--small", "--only", r"^qbackend nf4 eager$", "--batches", "1,2", "--compute", "fp32", "--json", str(out),
             "--rounds", "2")  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [x["method"] for x in rows] == ["qbackend nf4 eager"]
    for x in rows:
        assert "error" not in x, x
        assert sorted(x["batches"]) == ["1", "2"]
        for b in x["batches"].values():
            assert b["prefill_tok_s"] > 0 and b["decode_tok_s"] > 0
            assert 0 < b["peak_rss_mb_run"] <= x["peak_rss_mb_process"] + 1
            assert len(b["rounds"]) == 2 and b["decode_tok_s"] == pytest.approx(
                sum(rd["decode_tok_s"] for rd in b["rounds"]) / 2)  # the median of two rounds
        assert x["rounds"] == 2
    assert "B=2 decode tok/s" in r.stdout
    assert "medians over 2 interleaved rounds" in r.stdout
    assert r.stderr.count("qbackend nf4 eager (round") == 2
    assert rows[0]["compute"] == {"fp32": 15}  # --compute reached every quantized layer (2 blocks x 7, lm_head)
    assert "(compute fp32 x15)" in r.stdout


@pytest.mark.skipif(not (importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf")),
                    reason="llama-cpp-python / gguf not installed (benchmarks/setup_peers.sh)")  # fmt: skip
def test_gguf_conversion_matches_transformers(tmp_path):
    res = json.loads(_run("--small", "--check-gguf", cache=tmp_path).stdout.strip().splitlines()[-1])
    assert res["cosine"] > 0.9999, res


def _bench_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("_bench_llm", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_bench_llm"] = mod  # its dataclasses look their module up
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return mod


def test_rounds_combine_to_medians_and_keep_failures():
    combine = _bench_module().combine_rounds

    def run(decode: float, rss: float) -> dict:
        b = {"prefill_tok_s": 2 * decode, "decode_tok_s": decode, "prefill_s": 1.0, "decode_ms_per_step": 1e3 / decode,
             "warmup_s": 0.5, "peak_rss_mb_run": rss}  # fmt: skip
        return {"method": "m", "batches": {"1": b}, "setup_s": 3.0, "peak_rss_mb_process": rss + 10, "wall_s": 5.0}

    bad = {"method": "m", "error": "exit 1: boom", "wall_s": 1.0}
    row = combine([run(10.0, 100), bad, run(30.0, 90), run(20.0, 95)])
    b = row["batches"]["1"]
    assert b["decode_tok_s"] == 20.0 and b["prefill_tok_s"] == 40.0 and b["peak_rss_mb_run"] == 100
    assert [r["decode_tok_s"] for r in b["rounds"]] == [10.0, 30.0, 20.0]
    assert row["rounds"] == 3 and row["failed_rounds"] == ["exit 1: boom"] and row["wall_s"] == 16.0
    failed = combine([{"method": "m", "error": "timed out", "wall_s": 1.0}])
    assert failed["error"] == "timed out"


def test_model_dims_are_llama_configs_and_reach_the_child(monkeypatch):
    """Every ``--dims`` choice builds a Llama config (whole heads, grouped KV heads), and a method's
    subprocess gets the same choice (and ``--skip-module-guards``, ``--no-size-asserts``)."""
    mod = _bench_module()
    for name, dims in mod.DIMS.items():
        cfg = mod.llama_config(dims, 64)
        assert cfg.hidden_size % cfg.num_attention_heads == 0, name
        assert cfg.num_attention_heads % cfg.num_key_value_heads == 0, name
    assert mod.DIMS["qwen0.5b"]["hidden_size"] == 896
    seen = []

    def fake_run(args, **kw):
        seen.append(args)
        return subprocess.CompletedProcess(args, 1, "", "stopped here")

    monkeypatch.setattr(mod.subprocess, "run", fake_run)
    a = mod.argparse.Namespace(prompt=16, decode=4, batches="1", repeats=1, seed=0, compute="auto", small=False,
                               dims="qwen0.5b", sdpa_gqa=False, skip_module_guards=True, no_size_asserts=True,
                               threads=None, timeout=5)  # fmt: skip
    assert mod.run_method("qbackend nf4 eager", a)["error"] == "exit 1: stopped here"
    assert seen and seen[0][seen[0].index("--dims") + 1] == "qwen0.5b"
    assert "--skip-module-guards" in seen[0] and "--no-size-asserts" in seen[0]


def test_size_asserts_off_reaches_inductor_through_either_backend(monkeypatch):
    """``--no-size-asserts``: qbackend gets it in its ``inductor`` option, Inductor itself as an option."""
    mod = _bench_module()
    seen = []
    monkeypatch.setattr(mod.torch, "compile", lambda model, **kw: seen.append(kw) or model)
    lin = mod.torch.nn.Linear(2, 2)
    mod.TorchRunner(lin, None, True, mod.torch.float32, 8, backend="qbackend", options={"preset": "nf4"},
                    size_asserts=False)  # fmt: skip
    mod.TorchRunner(lin, None, True, mod.torch.bfloat16, 8, size_asserts=False)
    mod.TorchRunner(lin, None, True, mod.torch.bfloat16, 8)
    assert seen[0]["options"] == {"preset": "nf4", "inductor": {"size_asserts": False}}
    assert seen[1]["options"] == {"size_asserts": False}
    assert "options" not in seen[2]
