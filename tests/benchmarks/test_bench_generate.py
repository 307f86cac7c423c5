"""benchmarks/bench_generate.py on the tiny shape, run as a user runs it: every method's row, exact tokens of
the compiled row against the eager quantized one, compile counts (two at set-up, none while timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_generate.py"


@pytest.mark.slow
def test_tiny_run_rows_and_compile_counts(tmp_path):
    out = tmp_path / "gen.json"
    # compute fp32: the exact path, on which compiled and eager give identical tokens
    args = ["--shape", "tiny", "--presets", "nf4", "--min-params", "0", "--new-tokens", "6", "--rounds", "1",
            "--compute", "fp32", "--json", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {x["method"]: x for x in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["fp32 eager", "bf16 inductor", "qbackend nf4 eager", "qbackend nf4 compiled"]
    assert all(x["tokens_per_s"] > 0 and x["compiles_timed"] == 0 for x in rows.values())
    assert rows["qbackend nf4 compiled"]["same_tokens"] is True
    assert rows["qbackend nf4 compiled"]["compiles_setup"] == 2 and rows["qbackend nf4 eager"]["compiles_setup"] == 0
    assert rows["fp32 eager"]["vs_fp32_eager"] == pytest.approx(1.0)
    assert "| qbackend nf4 compiled |" in r.stdout and "load average before timing" in r.stdout
