"""benchmarks/bench_decode_ab.py in its smoke mode: both variants compiled and timed in one process, and
the switched setting really differs between them (the grouping pass: group calls only in B)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode_ab.py"


@pytest.mark.parametrize("ab", ["groups", "size-asserts"])
def test_smoke_times_both_variants(tmp_path, ab):
    out = tmp_path / "ab.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--small", "--ab", ab, "--rounds", "2", "--steps", "2",
                        "--prompt", "4", "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    a, b = res["ms_per_token"].values()
    assert len(a) == len(b) == 2 and min(a + b) > 0
    assert res["b_over_a"] > 0 and res["b_over_a_paired"] > 0 and "B/A:" in r.stdout
    calls = list(res["group_calls"].values())
    if calls[0] is not None:  # int8-compute kernels here: nf4 layers group at decode unless the pass is off
        assert (calls[0] == 0 and calls[1] > 0) if ab == "groups" else calls[0] == calls[1] > 0


def test_llama_cpp_against_qbackend(tmp_path):
    """With llama-cpp-python and gguf (the peers' venv): both timed in one process, llama.cpp as A, with the
    preset's llama.cpp type. Without them (CI's venv): a short error saying what to install."""
    out = tmp_path / "ab.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QB_BENCH_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, str(SCRIPT), "--small", "--ab", "llama.cpp", "--preset", "int8", "--rounds",
                        "2", "--steps", "2", "--prompt", "4", "--json", str(out)], capture_output=True, text=True,
                       timeout=600, env=env)  # fmt: skip
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        assert r.returncode != 0 and not out.exists()
        assert "needs llama-cpp-python and gguf" in r.stderr and len(r.stderr.strip().splitlines()[-1]) < 200
        return
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert list(res["ms_per_token"]) == ["llama.cpp Q8_0", "qbackend int8"]
    assert min(x for v in res["ms_per_token"].values() for x in v) > 0 and "decode tokens/s:" in r.stdout
    assert res["group_calls"]["llama.cpp Q8_0"] in (0, None)


def test_contradicting_options_are_a_short_error():
    r = subprocess.run([sys.executable, str(SCRIPT), "--small", "--ab", "size-asserts", "--no-size-asserts"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "--no-size-asserts fixes what --ab size-asserts switches" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--small", "--ab", "groups", "--rounds", "0"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "must be at least 1" in r.stderr
