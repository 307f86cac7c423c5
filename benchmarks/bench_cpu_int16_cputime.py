"""One-thread CPU time of int8 weights in the fp32, int16 and int8 compute modes against fp32 ``F.linear``.

Process CPU time (``time.process_time``) with one torch thread is steadier than wall time on a machine
shared with other jobs: it is what ``compute_policy.AUTO_FP32_ROWS`` for int8 weights was read from.
The op functions are called directly (the exact fp32 int8 kernel, ``int16_compute``, ``int8_compute``);
per shape and M the median of 5 repetitions of a batch of calls, in ms per call.

    python benchmarks/bench_cpu_int16_cputime.py [--shapes 4096x4096,1536x384] [--ms 1,8,16,64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import _common
import torch
import torch.nn.functional as F

from qbackend.kernels import cpu as kcpu
from qbackend.kernels.cpu import int8_compute, int16_compute


def cpu_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    ts = []
    for _ in range(5):
        t = time.process_time()
        for _ in range(reps):
            fn()
        ts.append((time.process_time() - t) / reps * 1e3)
    return sorted(ts)[2]


def _row(L, isa: int, w: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> list[str]:
    """The cells of one (shape, M): fp32 F.linear ms, then each int8-weight path's ms and ratio to it."""
    (n, k), m = w.shape, x.shape[0]
    reps = max(1, int(2e8 / (m * n * k)))
    base = cpu_ms(lambda: F.linear(x, w), reps)
    cells = [f"{base:.3f}"]
    for fn in (lambda: kcpu.int8_linear(x, codes, s, None, n, k),
               lambda: int16_compute.linear8(L, isa, x, codes, s, None, n, k),
               lambda: int8_compute.int8_linear(x, codes, s, None, n, k)):  # fmt: skip
        t = cpu_ms(fn, reps)
        cells.append(f"{t:.3f} ({base / t:.2f}x)")
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,1536x384,384x1536", help="NxK (out x in), comma list")
    p.add_argument("--ms", default="1,2,4,8,16,24,32,48,64,256", help="rows M of x (comma list)")
    args = p.parse_args()
    torch.set_num_threads(1)
    lib = int16_compute._lib()
    if lib is None:
        raise SystemExit("no int16 kernels on this CPU/build")
    L, isa = lib
    print(_common.header(extra="1 thread, process CPU time"))
    print("| N x K | M | fp32 F.linear ms | int8 W fp32 kernel | int8 W int16 | int8 W int8 |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.02
        s = w.abs().amax(1) / 127
        codes = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        for m in (int(v) for v in args.ms.split(",")):
            print(f"| {n}x{k} | {m} | " + " | ".join(_row(L, isa, w, codes, s, torch.randn(m, k))) + " |", flush=True)
    print(_common.load_line("load average after"))


if __name__ == "__main__":
    main()
