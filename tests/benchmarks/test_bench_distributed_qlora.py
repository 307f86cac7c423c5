"""benchmarks/bench_distributed_qlora.py on 2 ranks of a tiny model: the script as a user runs it (its own
process, ``--json``), which runs ``examples/qlora_fsdp_llama.py`` under ``torch.distributed.run``.

Checks the plumbing: one row per rank, each rank holds half the quantized base, glibc's heap figures
are recorded, the loss falls. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distributed_qlora.py"


@pytest.mark.slow  # two torchrun processes importing torch + transformers: ~30 s on 2 cores
def test_two_ranks_each_hold_half_the_base_and_report_memory(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(SCRIPT), "--ranks", "2", "--hidden", "256", "--layers", "2", "--batch", "4",
           "--seq", "16", "--steps", "3", "--warmup", "1", "--mmap-threshold", "1048576",
           "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       cwd=SCRIPT.parents[1], timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| mmap from 1024 KiB | 2 |")]
    assert len(rows) == 2
    (res,) = json.loads(out.read_text())["results"].values()
    held = [rank["quantized_base_bytes_held"] for rank in res["ranks"]]
    # halves up to the nested constants' blocks (an odd count of 256-constant blocks splits 1 row apart)
    assert sum(held) == res["ranks"][0]["quantized_base_bytes_whole"] and abs(held[0] - held[1]) < 0.01 * held[0]
    for rank in res["ranks"]:
        assert rank["heap_in_use_max"] >= rank["heap_before_train"]["in_use"] > 0
        assert rank["rss_peak_train_mb"] >= rank["rss_before_train_mb"]
    assert len(res["losses"]) == 3 and all(v > 0 for v in res["losses"])
