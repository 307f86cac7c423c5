"""Which int8 GEMM should CPU W8A8 use? The library options measured against fp32 ``F.linear``.

One process, interleaved rounds, medians; ratio = fp32 ``F.linear`` time / method time (higher is
faster). Methods (all compute x_int8 @ W_int8^T in int32, exact):

* ``qbackend w8a8 packed VNNI tiles`` / ``VNNI tiles`` / ``prologue+_int_mm+epilogue``: the
  ``torch.ops.qbackend.w8a8_linear`` op (activation quantization included) on its packed weight copy
  (its default), or without it on its canonical-layout VNNI kernel, or with its prologue,
  ``torch._int_mm`` and its epilogue (without the packed copy the op switches at ``w8a8.LIBRARY_MIN_M``);
* ``torch._int_mm``: oneDNN/own s8s8 GEMM of torch (int32 out) on the already-quantized activations;
* ``onednn qlinear s8`` / ``u8``: ``torch.ops.onednn.qlinear_pointwise`` (what Inductor's x86 int8
  lowering calls) on a prepacked weight, int8 or uint8 (+128 zero point) activations, fp32 out;
* ``fbgemm dynamic``: ``torch.ops.quantized.linear_dynamic`` (per-tensor dynamic activations, so
  not the per-token numerics; speed figure only), activation quantization included.

``--compiled`` also times ``torch.compile(mode="max-autotune")`` of the ``_int_mm`` call (Inductor's
CPP GEMM template); slow to compile.

Usage: ``python benchmarks/bench_cpu_w8a8_libs.py [--threads 2] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import statistics

import _common
import torch
import torch.nn.functional as F

import qbackend  # noqa: F401  (registers torch.ops.qbackend.*)
from qbackend.kernels.cpu import w8a8


def _w8a8_with(library_min_m: int, x, codes, scale, n: int, k: int, packing: bool = False):
    """The qbackend w8a8 op with its large-M switch and its packed weight copy forced (the op's own
    dispatch uses the packed copy where it can be made)."""
    old = w8a8.LIBRARY_MIN_M, w8a8.PACKING
    w8a8.LIBRARY_MIN_M, w8a8.PACKING = library_min_m, packing
    try:
        return torch.ops.qbackend.w8a8_linear(x, codes.view(-1), scale, None, None, n, k)
    finally:
        w8a8.LIBRARY_MIN_M, w8a8.PACKING = old


def _methods(n: int, k: int, m: int, compiled: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    scale = w.abs().amax(1) / 127
    codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    xs = x.abs().amax(1, keepdim=True) / 127
    xq = torch.clamp(torch.round(x / xs), -127, 127).to(torch.int8)
    xu = (xq.to(torch.int16) + 128).to(torch.uint8)
    wt = codes.t()  # [K, N] view
    wtc = codes.t().contiguous()
    packed = torch.ops.onednn.qlinear_prepack(codes, [m, k])
    ones = torch.ones(n)
    zeros = torch.zeros(n, dtype=torch.int64)
    onednn = torch.ops.onednn.qlinear_pointwise
    f32 = torch.float32
    meths = {
        "fp32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear": (lambda wb, xb: lambda: F.linear(xb, wb))(w.bfloat16(), x.bfloat16()),
        "qbackend w8a8 packed VNNI tiles": lambda: _w8a8_with(1 << 30, x, codes, scale, n, k, packing=True),
        "qbackend w8a8 VNNI tiles": lambda: _w8a8_with(1 << 30, x, codes, scale, n, k),
        "qbackend w8a8 prologue+_int_mm+epilogue": lambda: _w8a8_with(0, x, codes, scale, n, k),
        "torch._int_mm (W^T view)": lambda: torch._int_mm(xq, wt),
        "torch._int_mm (W^T contiguous)": lambda: torch._int_mm(xq, wtc),
        "onednn qlinear s8": lambda: onednn(xq, 1.0, 0, packed, ones, zeros, None, 1.0, 0, f32, "none", [], ""),
        "onednn qlinear u8": lambda: onednn(xu, 1.0, 128, packed, ones, zeros, None, 1.0, 0, f32, "none", [], ""),
    }
    try:
        qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        pk = torch.ops.quantized.linear_prepack(qw, None)
        meths["fbgemm dynamic (per-tensor act)"] = lambda: torch.ops.quantized.linear_dynamic(x, pk, False)
    except (RuntimeError, AttributeError) as e:
        print(f"# fbgemm dynamic unavailable: {str(e).splitlines()[0][:100]}")
    if compiled:
        f = torch.compile(lambda a, b: torch._int_mm(a, b), mode="max-autotune", dynamic=False)
        meths["inductor max-autotune _int_mm"] = lambda: f(xq, wtc)
    ref = xq.double() @ codes.double().t()
    for name in ("torch._int_mm (W^T view)", "onednn qlinear s8", "onednn qlinear u8"):
        assert torch.equal(meths[name]().double(), ref), name
    return meths


def _too_slow(name: str, samples: dict[str, list[float]]) -> bool:
    # oneDNN's s8 activations take a reference path here: one round of it is enough
    return statistics.median(samples[name]) > 10 * statistics.median(samples["fp32 F.linear"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_threads_option(ap)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--compiled", action="store_true", help="also Inductor max-autotune of _int_mm (slow)")
    ap.add_argument("--ms", default="1,8,64,480", help="M values of the 4096x4096 rows")
    args = ap.parse_args()
    _common.apply_threads(args)
    print(_common.header(extra=f"threads {torch.get_num_threads()}"))
    names: list[str] = []
    shapes = [(4096, 4096, int(m)) for m in args.ms.split(",")] + [(1536, 384, 16)]
    for n, k, m in shapes:
        meths = _methods(n, k, m, args.compiled)
        samples = _common.interleaved(meths, args.rounds, 5 if m < 64 else 2, warmup=1, alternate=True,
                                      give_up=_too_slow)  # fmt: skip
        med = _common.medians(samples)
        if not names:
            names = list(med)
            print("\n| shape | " + " | ".join(names) + " |")
            print("|---|" + "---:|" * len(names))
        base = med["fp32 F.linear"]
        lo = {nm: min(ts) for nm, ts in samples.items()}  # best call: steadier than the median on a loaded machine
        b_lo = lo["fp32 F.linear"]
        cells = [f"{base * 1e6:.0f} us" if nm == "fp32 F.linear" else f"{base / med[nm]:.2f}x ({b_lo / lo[nm]:.2f}x)"
                 for nm in names]  # fmt: skip
        print(f"| {k}->{n} M={m} | " + " | ".join(cells) + f" |  <!-- {_common.load_line()} -->", flush=True)
    print(f"\n# {_common.load_line('load average at the end')}")


if __name__ == "__main__":
    main()
