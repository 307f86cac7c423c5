"""CPU speed of int8 weights in ``compute="int16"`` against fp32 ``F.linear``, the fp32 and int8 modes and
ONNX Runtime's dynamic int8 MatMul, one process.

Shapes: a 4096x4096 layer and the MiniLM-sized 384->1536 and 1536->384 layers. Every method is timed
in interleaved rounds (a burst of load from other processes hits all alike); figures are medians
of all timed calls, as ratios to fp32 ``F.linear`` of the same round set. The error column is
``||y - y_exact|| / ||y_exact||`` with ``y_exact`` in float64 from the method's own dequantized
weight (arithmetic, not quantization). ORT runs only where onnxruntime is installed (the peers venv:
``PYTHONPATH=. /work/wt/bench/.venv/bin/python benchmarks/bench_cpu_int16_compute.py``).

    python benchmarks/bench_cpu_int16_compute.py --threads 2
    python benchmarks/bench_cpu_int16_compute.py --threads 2 --ms 1,8 --shapes 4096x4096 --blocks 128,0 --avx2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import _common
import torch
import torch.nn.functional as F

from qbackend.formats import Scheme, quantize
from qbackend.kernels import prepare_weight, quantized_linear, reference
from qbackend.kernels.cpu import _build, int16_compute

SHAPES = {"4096x4096": (4096, 4096), "384->1536": (1536, 384), "1536->384": (384, 1536)}


def _row(r: dict) -> str:
    return (f"| {r['shape']} | {r['M']} | {r['method']} | {r['median_ms']:.3f} | {r['ratio']:.2f}x "
            f"| {r['rel_err']:.1e} |")  # fmt: skip


def _with_block(fn: Callable[[torch.Tensor], torch.Tensor], block: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn run with ``reference.INT16_BLOCK = block`` (0: one scale per row), for tuning the block."""

    def run(x: torch.Tensor) -> torch.Tensor:
        old = reference.INT16_BLOCK
        reference.INT16_BLOCK = block if block > 0 else None
        try:
            return fn(x)
        finally:
            reference.INT16_BLOCK = old

    return run


def methods_for(shape: str, args: argparse.Namespace, tmp: Path) -> dict[str, tuple[Callable, torch.Tensor]]:
    torch.manual_seed(0)
    n, k = SHAPES[shape]
    w = torch.randn(n, k) * 0.02
    qw = quantize(w, Scheme("int", bits=8, granularity="channel"))
    wd = qw.dequantize(torch.float32)
    methods: dict[str, tuple[Callable, torch.Tensor]] = {"fp32 F.linear": (lambda x: F.linear(x, w), w)}
    for mode in ("fp32", "int8", "int16"):
        kw = prepare_weight(qw, compute=mode)
        fn = lambda x, kw=kw: quantized_linear(x, kw)  # noqa: E731
        if mode == "int16" and args.blocks:
            for b in args.blocks:
                methods[f"int8 W, int16 (block {b or 'row'})"] = (_with_block(fn, b), wd)
        else:
            methods[f"int8 W, {mode}"] = (fn, wd)
    if args.avx2:
        L = int16_compute.declare(_build.load_variant("avx2"))
        codes, scale = prepare_weight(qw, compute="int16").tensors
        methods["int8 W, int16 AVX2 kernel"] = (
            lambda x: int16_compute.linear8(L, int16_compute.ISA_AVX2, x, codes, scale, None, n, k), wd)  # fmt: skip
    if not args.no_peers:
        try:
            import _peers

            ort = _peers.ort_dynamic_int8(w, torch.get_num_threads(), tmp)
            methods["ORT dynamic int8"] = (ort.fn, ort.weight)
        except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
            print(f"(ORT dynamic int8 unavailable: {str(e).splitlines()[0][:120]})")
    return methods


def bench(shape: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    n, k = SHAPES[shape]
    methods = methods_for(shape, args, tmp)
    rows = []
    with torch.inference_mode():
        for m in args.ms:
            x = torch.randn(m, k)
            work = m * n * k
            n_calls = max(2, min(args.calls, int(args.calls * 4096 * 4096 * 8 / max(work, 1))))
            errors = {}
            for name, (fn, wref) in methods.items():
                y = fn(x)
                fn(x)
                exact = x.double() @ wref.double().t()
                errors[name] = float((y.double() - exact).norm() / exact.norm())
            calls_of = {name: (lambda fn=fn, x=x: fn(x)) for name, (fn, _) in methods.items()}
            times = _common.interleaved(calls_of, args.rounds, n_calls)
            base = statistics.median(times["fp32 F.linear"])
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append({"shape": shape, "M": m, "method": name, "median_ms": med * 1e3, "ratio": base / med,
                             "rel_err": errors[name], "calls": len(ts)})  # fmt: skip
                print(_row(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,384->1536", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--ms", default="1,8,64,480", help="rows M of x (comma list)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=10, help="calls per method per round at 4096^2 M=8 (scaled by size)")
    p.add_argument("--blocks", default="", help="int16 activation blocks to compare (comma list; 0 = per row)")
    p.add_argument("--avx2", action="store_true", help="also time the AVX2 kernels (the avx2 build)")
    p.add_argument("--no-peers", action="store_true", help="skip ONNX Runtime")
    p.add_argument("--json", help="write the rows here")
    _common.add_threads_option(p)
    args = p.parse_args()
    _common.apply_threads(args)
    args.ms = [int(v) for v in args.ms.split(",")]
    args.blocks = [int(v) for v in args.blocks.split(",")] if args.blocks else []
    print(_common.header(extra=f"int16 block {reference.INT16_BLOCK}"))
    print(_common.load_line())
    print("| shape | M | method | median ms | vs fp32 F.linear | rel. error vs own weight |")
    print("|---|---:|---|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            rows += bench(shape, args, Path(tmp))
    print(_common.load_line("load average after"))
    if args.json:
        _common.write_json(args.json, rows)


if __name__ == "__main__":
    main()
