"""benchmarks/bench_from_pretrained.py on a small checkpoint: qbackend.from_pretrained's peak memory bound.

The script loads the checkpoint in fresh processes and reads the kernel's high-water mark of each;
qbackend's peak must stay within 1.3 x the quantized model + the largest tensor, while the float
load of transformers (the anchor) goes over it: a measurement that could not tell them apart fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_from_pretrained.py"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_peak_rss_within_the_bound(tmp_path):
    out = tmp_path / "rows.json"
    methods = "qbackend.from_pretrained,transformers + quantize_"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--params", "1e8", "--vocab", "8000", "--methods", methods,
                        "--dir", str(tmp_path), "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "| qbackend.from_pretrained |" in r.stdout and "peak / (1.3 x model + largest tensor)" in r.stdout
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    largest = result["sizes"]["largest_tensor"]
    ours, anchor = rows["qbackend.from_pretrained"], rows["transformers + quantize_"]
    assert ours["finite"] and anchor["finite"]
    assert ours["peak_rss"] <= 1.3 * ours["model_bytes"] + largest, ours
    assert anchor["peak_rss"] > 1.3 * anchor["model_bytes"] + largest, anchor  # the float model was resident
    assert result["sizes"]["file_bytes"] > 2.5 * ours["model_bytes"]  # a checkpoint the bound can tell from float
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("qb-bench-pretrained-")]  # deleted after
