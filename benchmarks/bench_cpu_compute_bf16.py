"""The "bf16" compute mode on CPU against the fp32 path and fp32 / bf16 ``F.linear``.

One process, interleaved rounds, medians; ratio = fp32 ``F.linear`` time / method time (higher is
faster; in brackets the same from each method's best call, steadier on a loaded machine). From M = 64
it also times the bf16 panels + MKL bf16 GEMM path (``FUSED_MAX_M`` in
``qbackend/kernels/cpu/bf16_compute.py``); and, per row, the relative error of each bf16 method against
the fp32 path of its format (max |y - y_fp32| / max |y_fp32|).

Usage: ``python benchmarks/bench_cpu_compute_bf16.py [--threads 2] [--ms 1,8,64,480] [--shapes 4096x4096,1536x384]``
"""

from __future__ import annotations

import argparse

import _common
import torch
import torch.nn.functional as F

from qbackend.formats import Scheme, quantize
from qbackend.kernels import prepare_weight, quantized_linear
from qbackend.kernels.cpu import bf16_compute

FORMATS = {
    "nf4+nested b64": Scheme("nf4", blocksize=64, nested=True),
    "int4 g128 affine": Scheme("int", bits=4, symmetric=False, blocksize=128),
    "int8 channel": Scheme("int", bits=8, granularity="channel"),
}


def _methods(n: int, k: int, both: bool) -> dict:
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    w16 = w.bfloat16()
    meths = {"fp32 F.linear": lambda x: F.linear(x, w), "bf16 F.linear": lambda x: F.linear(x.bfloat16(), w16)}
    for name, scheme in FORMATS.items():
        qw = quantize(w, scheme)
        for compute in ("fp32", "bf16"):
            kw = prepare_weight(qw, compute=compute)
            meths[f"{name} {compute}"] = lambda x, kw=kw: quantized_linear(x, kw)
        if both:
            kw = prepare_weight(qw, compute="bf16")

            def panels(x, kw=kw):
                old = bf16_compute.FUSED_MAX_M
                bf16_compute.FUSED_MAX_M = 0
                try:
                    return quantized_linear(x, kw)
                finally:
                    bf16_compute.FUSED_MAX_M = old

            meths[f"{name} bf16 MKL-panels"] = panels
    return meths


def _cells(names: list[str], samples: dict[str, list[float]]) -> list[str]:
    """Cells "<median ratio>x (<best-call ratio>x)"; the best call is steadier than the median under load."""
    med, lo = _common.medians(samples), {nm: min(ts) for nm, ts in samples.items()}
    b, b_lo = med["fp32 F.linear"], lo["fp32 F.linear"]
    return [f"{b * 1e6:.0f} us" if nm == "fp32 F.linear" else f"{b / med[nm]:.2f}x ({b_lo / lo[nm]:.2f}x)"
            for nm in names]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_threads_option(ap)
    ap.add_argument("--ms", default="1,8,64,480")
    ap.add_argument("--shapes", default="4096x4096,1536x384", help="NxK list")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    _common.apply_threads(args)
    print(_common.header(extra=f"threads {torch.get_num_threads()}"))
    names: list[str] = []
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        ms = [int(v) for v in args.ms.split(",")] if n == k else [16]
        for m in ms:
            meths = _methods(n, k, both=m >= 64)
            x = torch.randn(m, k)
            with torch.inference_mode():
                outs = {nm: f(x) for nm, f in meths.items()}
                errs = {}
                for nm, y in outs.items():
                    ref = next((outs[o] for o in outs if o.endswith(" fp32") and nm.startswith(o[:-5])), None)
                    if ref is not None and not nm.endswith(" fp32"):
                        errs[nm] = float((y - ref).abs().max() / ref.abs().max())
                calls = {nm: (lambda f=f, x=x: f(x)) for nm, f in meths.items()}
                samples = _common.interleaved(calls, args.rounds, 5 if m < 64 else 2, warmup=1, alternate=True)
            med = _common.medians(samples)
            base = med["fp32 F.linear"]
            if not names:
                names = [nm for nm in med if "MKL-panels" not in nm]
                print("\n| shape | " + " | ".join(names) + " | bf16 MKL panels (format order) |")
                print("|---|" + "---:|" * (len(names) + 1))
            cells = _cells(names, samples)
            panels = " / ".join(f"{base / med[nm]:.2f}x" for nm in med if "MKL-panels" in nm) or "-"
            print(f"| {k}->{n} M={m} | " + " | ".join(cells) + f" | {panels} |  <!-- {_common.load_line()} -->",
                  flush=True)  # fmt: skip
            if errs:
                print("<!-- rel err vs fp32 path: " + ", ".join(f"{nm} {e:.1e}" for nm, e in errs.items()) + " -->")


if __name__ == "__main__":
    main()
