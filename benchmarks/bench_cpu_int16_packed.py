"""One-thread CPU time of int8 weights in ``compute="int16"``: the packed weight copy against the canonical
kernels, fp32 ``F.linear`` and ONNX Runtime's dynamic int8 MatMul (``quantize_dynamic``), one process.

Process CPU time (``time.process_time``) with one thread (torch and ORT) is steadier than wall time on a
machine shared with other jobs. Rounds are interleaved (every method of every shape and M once per round);
the figure is the median over rounds of the mean over a batch of calls, in µs per call. "canonical" is
``int16_compute.PACKING = False`` (the kernels that read the codes in their [N, K] layout); "int8 module
(auto)" is the layer ``qbackend.quantize_`` makes with the "int8" preset, called as a user does (its
``compute="auto"`` per-call choice included). ORT needs the peers venv (``benchmarks/setup_peers.sh``);
without it that column is left out. Run with another tree on PYTHONPATH for a before/after comparison.

    python benchmarks/bench_cpu_int16_packed.py [--shapes 384x384,1536x384] [--ms 1,8,64,480] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common
import torch
import torch.nn.functional as F

import qbackend
from qbackend.kernels.cpu import int16_compute


def _cpu_us(fn: Callable[[], object], reps: int) -> float:
    t = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t) / reps * 1e6


def _packing(on: bool, fn: Callable[[], object]) -> Callable[[], object]:
    if not hasattr(int16_compute, "PACKING"):  # a tree from before the packed copy: its one kernel
        return fn

    def run() -> object:
        old = int16_compute.PACKING
        int16_compute.PACKING = on
        try:
            return fn()
        finally:
            int16_compute.PACKING = old

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="384x384,1536x384,384x1536,4096x4096", help="NxK (out x in), comma list")
    p.add_argument("--ms", default="1,8,64,480", help="rows M of x (comma list)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget-ms", type=float, default=20.0, help="CPU time per method per cell per round")
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        import _peers

        tmp = Path(tempfile.mkdtemp())
        ort_of = lambda w: _peers.ort_dynamic_int8(w, 1, tmp).fn  # noqa: E731
        _peers._ort()
    except Exception as e:  # noqa: BLE001
        print(f"(no ORT: {type(e).__name__}: {e})")
        ort_of = None
    cells = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.02
        s = w.abs().amax(1) / 127
        codes = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        ort = ort_of(w) if ort_of else None
        module = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            module.weight.copy_(w)
        module = torch.nn.Sequential(module)
        qbackend.quantize_(module, {"preset": "int8"})
        module = module[0]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k)
            fns = {
                "fp32 F.linear": lambda x=x, w=w: F.linear(x, w),
                "int16 canonical": _packing(False, lambda x=x, c=codes, s=s, n=n, k=k:
                                            int16_compute.int8_linear(x, c, s, None, n, k)),
                "int16 packed": _packing(True, lambda x=x, c=codes, s=s, n=n, k=k:
                                         int16_compute.int8_linear(x, c, s, None, n, k)),
                "int8 module (auto)": lambda x=x, mod=module: mod(x),
            }  # fmt: skip
            if ort is not None:
                fns["ORT dynamic int8"] = lambda x=x, ort=ort: ort(x)
            reps = {}
            for name, fn in fns.items():
                with torch.no_grad():
                    fn()
                    t = _cpu_us(fn, 3)
                reps[name] = max(3, int(args.budget_ms * 1e3 / max(t, 1.0)))
            cells.append((f"{n}<-{k}", m, fns, reps, {name: [] for name in fns}))
    print(_common.header(extra="1 thread, process CPU time, µs per call"))
    print(_common.load_line("load average before"))
    with torch.no_grad():
        for _ in range(args.rounds):
            for _shape, _m, fns, reps, times in cells:
                for name, fn in fns.items():
                    times[name].append(_cpu_us(fn, reps[name]))
    names = list(cells[0][2]) if cells else []
    print("| layer N<-K | M | " + " | ".join(names) + " | packed / ORT |")
    print("|---|---:|" + "---:|" * (len(names) + 1))
    for shape, m, _fns, _reps, times in cells:
        med = {name: statistics.median(v) for name, v in times.items()}
        ratio = f"{med['int16 packed'] / med['ORT dynamic int8']:.2f}" if "ORT dynamic int8" in med else "-"
        print(f"| {shape} | {m} | " + " | ".join(f"{med[name]:.1f}" for name in names) + f" | {ratio} |")
    print(_common.load_line("load average after"))


if __name__ == "__main__":
    main()
