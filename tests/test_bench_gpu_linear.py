"""The GPU benchmark's plumbing, on CPU through the Triton interpreter (no timings: correctness only)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu_linear  # noqa: E402


def test_dry_run_checks_every_forward_and_grad_input_kernel_against_its_dequantized_reference(capsys):
    rc = bench_gpu_linear.main(["--dry-run-cpu", "--grad", "--formats", "bf16,nf4-nested,int4,int8,w8a8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "dry run: 54 rows, 0 with an error above 1e-4" in out
    for fmt in ("nf4-nested-grad", "int4-grad", "int8-grad"):
        assert out.count(f" {fmt} ") == 6  # 2 shapes x 3 batch sizes, none failed
    assert "failed" not in out and "unavailable" not in out
