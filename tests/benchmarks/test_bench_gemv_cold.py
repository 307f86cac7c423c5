"""benchmarks/bench_gemv_cold.py on a tiny layer, one round: the plumbing (not a timing).

Runs the script as a user would (its own process). Two small-M streaming settings of the same library
are compared, so the script's own check that every column computed the same result runs too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from qbackend.kernels.cpu import int8_compute

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gemv_cold.py"


@pytest.mark.skipif(int8_compute._lib() is None, reason="no AVX-512 build of the CPU kernels here")
def test_one_round_on_a_tiny_layer():
    r = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "40x256", "--ms", "1,3", "--mb", "1",
                        "--rounds", "1", "--stream-mb", "8", "--knobs", "0:0,1:1:2", "--threads", "2"],
                       capture_output=True, text=True, cwd=SCRIPT.parents[1], timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "WARNING" not in r.stderr, r.stderr[-2000:]
    for fmt in ("nf4", "int4", "int8"):
        for m in (1, 3):
            row = re.search(rf"^\| 40x256 \| {fmt} \| {m} \|(.*)\| ([\d.]+) \|$", r.stdout, re.M)
            assert row, (fmt, m, r.stdout[-2000:])
            assert len(re.findall(r"\d+ \([\d.]+, \d+%\)", row.group(1))) == 4, row.group(0)  # 2 settings x 2 paths


@pytest.mark.skipif(int8_compute._lib() is None, reason="no AVX-512 build of the CPU kernels here")
def test_int16_path_of_int8_weights():
    r = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "40x256", "--formats", "int8", "--paths", "int16,fp32",
                        "--mb", "1", "--rounds", "1", "--stream-mb", "8", "--knobs", "0:0,1:1:4", "--threads", "2"],
                       capture_output=True, text=True, cwd=SCRIPT.parents[1], timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    row = re.search(r"^\| 40x256 \| int8 \| 1 \|(.*)\| ([\d.]+) \|$", r.stdout, re.M)
    assert row, r.stdout[-2000:]
    assert len(re.findall(r"\d+ \([\d.]+, \d+%\)", row.group(1))) == 4, row.group(0)  # 2 settings x 2 paths
