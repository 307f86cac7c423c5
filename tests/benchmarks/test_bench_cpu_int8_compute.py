"""benchmarks/bench_cpu_int8_compute.py on the small MiniLM-sized layer, one round: the plumbing.

Runs the script as a user would (its own process), never importing it; checks that every format's
"int8" row is there with an arithmetic error in the mode's documented range (not a timing).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cpu_int8_compute.py"
FORMATS = ("nf4+nested b64", "int4 g128 affine", "int4 g32 sym", "int8 per-channel")


def test_one_round_on_the_small_layer():
    r = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "384->1536", "--ms", "1,33", "--rounds", "1",
                        "--calls", "1", "--threads", "1"], capture_output=True, text=True, cwd=SCRIPT.parents[1],
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for m in (1, 33):
        for f in FORMATS:
            for mode, lo, hi in (("fp32", 0.0, 1e-5), ("int8", 1e-3, 1.5e-2)):
                name = re.escape(f"{f} {mode}")
                pattern = rf"^\| 384->1536 \| {m} \| {name} \| [\d.]+ \| [\d.]+x \| ([\d.e+-]+) \|$"
                row = re.search(pattern, r.stdout, re.M)
                assert row, (m, f, mode, r.stdout[-2000:])
                assert lo <= float(row.group(1)) <= hi, (m, f, mode, row.group(0))
