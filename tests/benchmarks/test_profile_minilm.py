"""benchmarks/profile_minilm.py: its count of what Inductor's generated code calls per forward.

The script itself needs the MiniLM extra and a minute; here its counting function runs (from the
benchmarks folder, as the script does) on the code Inductor generates for a small quantized model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

SNIPPET = """
import json, torch, qbackend
from torch._inductor.utils import run_and_get_code
from profile_minilm import count_code
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
qbackend.quantize_(m, {"preset": "nf4"})
with torch.no_grad():
    _, codes = run_and_get_code(torch.compile(m, backend="qbackend", dynamic=False), torch.randn(3, 256))
print(json.dumps(count_code("\\n".join(codes))))
"""


def test_count_code_counts_the_direct_kernel_calls_and_input_asserts():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, env=env, cwd=BENCH,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts["qbackend direct kernels"] == 2  # the two quantized linears
    assert counts["C++ kernels (cpp_fused_*)"] >= 1  # the GELU between them
    assert counts["size/stride asserts (of graph inputs)"] >= 2  # x and the quantized buffers (Inductor's default)
    assert counts["wrapper lines"] > counts["qbackend direct kernels"]
