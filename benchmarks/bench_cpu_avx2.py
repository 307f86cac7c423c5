"""The AVX2 build of the CPU kernels (what a CPU with AVX2 + FMA but no AVX-512 runs), before/after its
fused kernels, against fp32 ``F.linear``, on any CPU with AVX2.

Per layer shape and M: fp32 ``F.linear`` (torch's own, which uses whatever ISA this CPU has: on an
AVX-512 machine it is NOT what an AVX2-only CPU would run), then per format the quantized op with
the library built for "avx2" as it was before its AVX2 kernels ("avx2 before": the portable
path, scalar dequantization + BLAS) and as it is ("avx2"), and the "avx512" build where this CPU
runs it. One process, the
methods timed in interleaved rounds, medians; each method's max error against fp32 ``F.linear``
on its own dequantized weight is checked (relative to max |y|) and printed.

    python benchmarks/bench_cpu_avx2.py                 # 4096x4096 and 384->1536, M in 1, 8, 64
    python benchmarks/bench_cpu_avx2.py --threads 1
    python benchmarks/bench_cpu_avx2.py --ms 1 8 64 480
    python benchmarks/bench_cpu_avx2.py --rounds 1 --budget 0.002   # plumbing only
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import _common
import torch
import torch.nn.functional as F

from qbackend.formats import Scheme, quantize
from qbackend.kernels import cpu, prepare_weight, quantized_linear
from qbackend.kernels.cpu import _build

FORMATS = {
    "NF4+nested b64": Scheme("nf4", blocksize=64, nested=True),
    "INT4 g128 affine": Scheme("int", bits=4, symmetric=False, blocksize=128),
    "INT8 per-channel": Scheme("int", bits=8, granularity="channel"),
}
SHAPES = {"4096x4096": (4096, 4096), "384->1536": (1536, 384)}  # (N, K)


def _variants() -> dict[str, tuple]:
    """name -> (library, portable) of each build this CPU can run. "avx2 before" is the avx2 build as
    it was without its AVX2 kernels: the portable path (scalar dequantization + BLAS)."""
    avx2 = _build.load_variant("avx2")
    _build.set_blas(avx2)
    out = {"avx2 before": (avx2, True), "avx2": (avx2, False)}
    if _build.cpu_variant() == "avx512":
        avx512 = _build.load_variant("avx512")
        _build.set_blas(avx512)
        out["avx512"] = (avx512, False)
    return out


def _with(lib, portable: bool, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        cpu.lib, cpu._force_portable = (lambda: lib), portable
        return fn()

    return call


def _calls(fn: Callable[[], object], budget: float) -> int:
    t0 = time.perf_counter()
    fn()
    return int(min(500, max(3, budget / max(time.perf_counter() - t0, 1e-6))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_threads_option(ap)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget", type=float, default=0.02, help="seconds per method per round")
    args = ap.parse_args()
    _common.apply_threads(args)
    print(_common.header(extra=f"threads {torch.get_num_threads()}"))
    variants = _variants()
    saved = cpu.lib, cpu._force_portable
    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        for shape, (n, k) in SHAPES.items():
            w = torch.randn(n, k, generator=gen) * 0.02
            weights = {f: prepare_weight(quantize(w, s), "cpu") for f, s in FORMATS.items()}
            deq = {f: quantize(w, s).dequantize(torch.float32) for f, s in FORMATS.items()}
            for m in args.ms:
                x = torch.randn(m, k, generator=gen)
                methods: dict[str, Callable[[], torch.Tensor]] = {}
                methods["fp32 F.linear"] = lambda x=x, w=w: F.linear(x, w)
                errs: dict[str, float] = {}
                for f, kw in weights.items():
                    want = F.linear(x, deq[f])
                    for v, (lib, portable) in variants.items():
                        fn = _with(lib, portable, lambda x=x, kw=kw: quantized_linear(x, kw))
                        errs[f"{f} | {v}"] = float((fn() - want).abs().max() / want.abs().max())
                        methods[f"{f} | {v}"] = fn
                calls = {name: _calls(fn, args.budget) for name, fn in methods.items()}
                med = _common.medians(_common.interleaved(methods, args.rounds, 1, warmup=2,
                                                          calls_for=calls.__getitem__))  # fmt: skip
                rows.append((shape, m, med, errs))
                print(f"# {shape} M={m} done; {_common.load_line()}", flush=True)
    finally:
        cpu.lib, cpu._force_portable = saved

    names = list(variants)
    print(f"\n## Time per call (us) and speed vs fp32 F.linear (x), threads {torch.get_num_threads()}\n")
    head = ["shape", "M", "fp32 F.linear us"] + [f"{f} {v}" for f in FORMATS for v in names]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(head) - 2))
    for shape, m, med, _ in rows:
        t0 = med["fp32 F.linear"]
        cells = [shape, str(m), f"{t0 * 1e6:.0f}"]
        for f in FORMATS:
            for v in names:
                t = med[f"{f} | {v}"]
                cells.append(f"{t * 1e6:.0f} us ({t0 / t:.2f}x)")
        print("| " + " | ".join(cells) + " |")
    worst = max(e for *_, errs in rows for e in errs.values())
    print(f"\nmax error of any method vs fp32 F.linear on its dequantized weight: {worst:.2e} of max |y|")
    print(f"# {_common.load_line('load average at the end')}")


if __name__ == "__main__":
    main()
