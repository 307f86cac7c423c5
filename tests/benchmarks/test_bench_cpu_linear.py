"""benchmarks/bench_cpu_linear.py in its smoke mode (a 256x256 layer), run as a user runs it (``--json``).

Checks the plumbing of the hot and cold tables and each method's error column: qbackend's exact
path is exact, the int8-activation and bf16 paths show their added error. Where the peer libraries
are installed (benchmarks/setup_peers.sh), their rows are checked against their own dequantized
weights too, which is what makes the error column of a peer trustworthy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cpu_linear.py"


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--small", "--json", str(out), *args], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout + r.stderr


def test_smoke_hot_and_cold_tables_qbackend_only(tmp_path):
    res, text = _run(tmp_path, "--no-peers", "--cold")
    hot = res["hot"]["256x256"]
    assert sorted(hot) == ["1", "8"]
    modes = res["compute_modes"]
    for m, rows in hot.items():
        names = list(rows)
        assert names[:2] == ["fp32 F.linear", "bf16 F.linear"]
        assert rows["fp32 F.linear"]["ratio"] == 1.0
        for r in rows.values():
            assert r["ms"] > 0 and r["min_ms"] <= r["ms"] and r["ratio"] > 0
        assert 1e-4 < rows["bf16 F.linear"]["err"] < 1e-2  # bf16 rounding of x and W
        w8a8 = rows["qbackend w8a8 (int8 act per token)"]
        assert 1e-4 < w8a8["err"] < 5e-2  # int8 activations: visible, bounded
        for preset in ("nf4 b64 nested", "int4 g128", "int8"):
            exact = f"qbackend {preset}" if modes == [None] else f"qbackend {preset} compute=fp32"
            assert rows[exact]["err"] < 1e-5, (m, exact, rows[exact])
    cold = res["cold"]["256x256 M=1"]
    assert cold["stream read (1 GiB sum)"]["of_stream"] == pytest.approx(1.0)
    for name, r in cold.items():
        assert r["layers"] >= 1 and r["gbps"] > 0 and r["ms_per_layer"] > 0, name
    assert cold["fp32 F.linear"]["layers"] >= 2
    assert "| method | M=1 | M=8 | err |" in text and "of stream read" in text


def _have(*mods: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in mods)


@pytest.mark.skipif(not _have("onnxruntime", "llama_cpp"), reason="no peer library (benchmarks/setup_peers.sh)")
def test_peer_rows_compute_with_the_weights_we_dequantize(tmp_path):
    res, text = _run(tmp_path, "--only", "ORT|ggml|bnb", "--ms", "1,8")
    for m, rows in res["hot"]["256x256"].items():
        for name, r in rows.items():
            if "acc0" in name:  # fp32 compute on the 4-bit weight: exact against it
                assert r["err"] < 1e-5, (m, name, r)
            elif name != "fp32 F.linear":  # int8 or bf16 activations: small, never the quantization error
                assert r["err"] < 3e-2, (m, name, r)
    if importlib.util.find_spec("onnxruntime"):
        assert any(n.startswith("ORT MatMulNBits b128 acc4") for n in res["hot"]["256x256"]["1"])
    if importlib.util.find_spec("llama_cpp"):
        assert {"ggml Q4_0 repack", "ggml Q4_K", "ggml Q8_0"} <= set(res["hot"]["256x256"]["1"])
