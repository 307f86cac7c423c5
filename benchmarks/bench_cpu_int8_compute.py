"""CPU speed of the weight-only ops in ``compute="int8"`` (VNNI) against fp32 ``F.linear``, one process.

Shapes: a 4096x4096 layer and the MiniLM-sized 384->1536 and 1536->384 layers. Every method is timed
in interleaved rounds (a burst of load from other processes hits all alike); figures are medians
of all timed calls, as ratios to fp32 ``F.linear`` of the same round set. The error column is
``||y - y_exact|| / ||y_exact||`` with ``y_exact`` in float64 from the method's own dequantized
weight: it measures the arithmetic (int8 activations, the NF4 table image), not quantization.

    python benchmarks/bench_cpu_int8_compute.py --threads 2
    python benchmarks/bench_cpu_int8_compute.py --threads 2 --ms 1,8 --shapes 4096x4096 --quick
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import _common
import torch
import torch.nn.functional as F

from qbackend.formats import Scheme, quantize
from qbackend.kernels import prepare_weight, quantized_linear

FORMATS = {
    "nf4+nested b64": Scheme("nf4", blocksize=64, nested=True),
    "int4 g128 affine": Scheme("int", bits=4, symmetric=False, blocksize=128),
    "int4 g32 sym": Scheme("int", bits=4, symmetric=True, blocksize=32),
    "int8 per-channel": Scheme("int", bits=8, granularity="channel"),
}
SHAPES = {"4096x4096": (4096, 4096), "384->1536": (1536, 384), "1536->384": (384, 1536)}


def _row(r: dict) -> str:
    return (f"| {r['shape']} | {r['M']} | {r['method']} | {r['median_ms']:.3f} | {r['ratio']:.2f}x "
            f"| {r['rel_err']:.1e} |")  # fmt: skip


def bench(shape: str, ms: list[int], rounds: int, calls: int, fp32_kernels: bool) -> list[dict]:
    torch.manual_seed(0)
    n, k = SHAPES[shape]
    w = torch.randn(n, k) * 0.02
    w16 = w.bfloat16()
    methods: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = {
        "fp32 F.linear": (lambda x: F.linear(x, w), w),
        "bf16 F.linear": (lambda x: F.linear(x.bfloat16(), w16).float(), w),
    }
    for name, scheme in FORMATS.items():
        qw = quantize(w, scheme)
        wd = qw.dequantize(torch.float32)
        modes = ("fp32", "int8") if fp32_kernels else ("int8",)
        for mode in modes:
            kw = prepare_weight(qw, compute=mode)
            methods[f"{name} {mode}"] = (lambda x, kw=kw: quantized_linear(x, kw), wd)
    rows = []
    with torch.inference_mode():
        for m in ms:
            x = torch.randn(m, k)
            work = m * n * k
            n_calls = max(2, min(calls, int(calls * 4096 * 4096 * 8 / max(work, 1))))
            errors = {}
            for name, (fn, wref) in methods.items():
                y = fn(x)
                fn(x)
                exact = x.double() @ wref.double().t()
                errors[name] = float((y.double() - exact).norm() / exact.norm())
            calls_of = {name: (lambda fn=fn, x=x: fn(x)) for name, (fn, _) in methods.items()}
            times = _common.interleaved(calls_of, rounds, n_calls)
            base = statistics.median(times["fp32 F.linear"])
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append({"shape": shape, "M": m, "method": name, "median_ms": med * 1e3, "ratio": base / med,
                             "rel_err": errors[name], "calls": len(ts)})  # fmt: skip
                print(_row(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", default="1,8,16,64,480", help="comma-separated batch sizes M")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=20, help="timed calls per method per round (fewer for big work)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 5 calls")
    p.add_argument("--no-fp32-kernels", action="store_true", help="skip the formats' compute='fp32' kernels")
    _common.add_threads_option(p)
    a = p.parse_args()
    _common.apply_threads(a)
    if a.quick:
        a.rounds, a.calls = 2, 5
    ms = [int(v) for v in a.ms.split(",")]
    print(_common.header(extra=f"threads {torch.get_num_threads()}"))
    print("\n| shape | M | method | median ms | ratio to fp32 F.linear | rel. error |")
    print("|---|---:|---|---:|---:|---:|", flush=True)
    rows = []
    for shape in a.shapes.split(","):
        rows += bench(shape, ms, a.rounds, a.calls, not a.no_fp32_kernels)
    print(f"\n# {_common.load_line('load average at the end')}")
    print("\n| shape | M | " + " | ".join(FORMATS) + " | (int8 compute, ratio to fp32 F.linear) |")
    print("|---|---:|" + "---:|" * (len(FORMATS) + 1))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for m in dict.fromkeys(r["M"] for r in rows if r["shape"] == shape):
            got = {r["method"]: r["ratio"] for r in rows if r["shape"] == shape and r["M"] == m}
            print(f"| {shape} | {m} | " + " | ".join(_common.fmt(got.get(f"{f} int8"), ".2f", "x") for f in FORMATS)
                  + " | |")  # fmt: skip


if __name__ == "__main__":
    main()
