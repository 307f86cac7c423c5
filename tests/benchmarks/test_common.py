"""benchmarks/_common.py, what every benchmark script shares, exercised the way the scripts use it.

Nothing here imports a benchmark by path: the scripts run in their own process with tiny settings,
and ``_common``'s timing is checked by a snippet run from the benchmarks folder (as a script is).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qbackend

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _assert_header(line: str) -> None:
    assert line.startswith("# 20") and " UTC; " in line  # the date first
    assert f"torch {torch.__version__}" in line and f"qbackend {qbackend.__version__}" in line
    assert re.search(r"\d+ cores \(\d+ torch threads\), GPU: ", line)
    if hasattr(os, "getloadavg"):
        assert "load average at the start: " in line


def test_interleaved_rounds_take_turns_alternate_and_give_up_on_slow_methods():
    snippet = (
        "import json, _common\n"
        "order = []\n"
        "fns = {n: (lambda n=n: order.append(n)) for n in 'abc'}\n"
        "s = _common.interleaved(fns, 3, 2, warmup=1, alternate=True, give_up=lambda n, s: n == 'c')\n"
        "m = _common.medians({'x': [3.0, 1.0, 2.0]})\n"
        "print(json.dumps({'order': ''.join(order), 'counts': {k: len(v) for k, v in s.items()}, 'median': m}))\n"
    )
    out = json.loads(_python(["-c", snippet], BENCH).stdout)
    # warm-up once each; round 0 a, b, c; round 1 reversed without c (given up); round 2 in order
    assert out["order"] == "abc" + "aabbcc" + "bbaa" + "aabb"
    assert out["counts"] == {"a": 6, "b": 6, "c": 2} and out["median"] == {"x": 2.0}


def test_format_and_results_files(tmp_path):
    snippet = (
        "import json, sys, _common\n"
        "print(_common.fmt(None, '8.1f', missing='-'.rjust(8)) + '|' + _common.fmt(2.345, '.2f', 'x'))\n"
        "_common.write_json(sys.argv[1] + '/deep/r.json', {'a': 1})\n"
        "print(_common.header(extra='tiny'))\n"
    )
    lines = _python(["-c", snippet, str(tmp_path)], BENCH).stdout.splitlines()
    assert lines[0] == "       -|2.35x"
    assert lines[1] == f"wrote {tmp_path / 'deep' / 'r.json'}"
    assert json.loads((tmp_path / "deep" / "r.json").read_text()) == {"a": 1}
    _assert_header(lines[2])
    assert lines[2].endswith("; tiny")


def test_cpu_linear_tiny_run_prints_the_header_and_a_row_per_method():
    args = ["--small", "--no-peers", "--ms", "1,3"]
    out = _python([str(BENCH / "bench_cpu_linear.py"), *args], BENCH.parent).stdout
    _assert_header(out.splitlines()[0])
    assert "256x256, hot weights" in out and "| method | M=1 | M=3 | err |" in out
    rows = [ln.split(" | ") for ln in out.splitlines() if ln.startswith("| ") and "x (" in ln]
    names = [r[0].lstrip("| ") for r in rows]
    assert names[:2] == ["fp32 F.linear", "bf16 F.linear"] and "qbackend w8a8 (int8 act per token)" in names
    for r in rows:
        if r[0] == "| fp32 F.linear":
            assert r[1].startswith("1.00x") and r[2].startswith("1.00x")  # ratios to fp32 in the same rounds
        if r[0].startswith("| qbackend") and "w8a8" not in r[0] and "compute=" not in r[0]:
            assert float(r[3].rstrip(" |")) < 1e-5  # exact path: arithmetic error against its own weight


def test_quantize_quick_run_matches_bitsandbytes_bytes():
    pytest.importorskip("bitsandbytes")
    out = _python([str(BENCH / "bench_quantize.py"), "--quick", "--repeats", "2"], BENCH.parent).stdout
    _assert_header(out.splitlines()[0])
    row = next(ln for ln in out.splitlines() if ln.startswith("| NF4 b64 nested, fp32 4096x4096"))
    assert row.split("|")[5].strip() == "yes"  # same codes and constants as bitsandbytes
    assert "load average at the end" in out or not hasattr(os, "getloadavg")
