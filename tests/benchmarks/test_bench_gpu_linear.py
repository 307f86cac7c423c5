"""The GPU benchmark's plumbing, on CPU through the Triton interpreter (no timings: correctness only).

Runs the script as a user would (its own process, from the repository root), never importing it.
"""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu_linear.py"


def test_dry_run_checks_every_forward_and_grad_input_kernel_against_its_dequantized_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # CPU tensors: the interpreter, even on a GPU machine
    args = ["--dry-run-cpu", "--grad", "--formats", "bf16,nf4-nested,int4,int8,w8a8"]
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                       cwd=SCRIPT.parents[1], timeout=900)  # fmt: skip
    out = r.stdout
    assert r.returncode == 0, out + r.stderr[-3000:]
    assert "dry run: 54 rows, 0 with an error above 1e-4" in out
    for fmt in ("nf4-nested-grad", "int4-grad", "int8-grad"):
        assert out.count(f" {fmt} ") == 6  # 2 shapes x 3 batch sizes, none failed
    assert "failed" not in out and "unavailable" not in out
