"""The "int8" compute kernel at small M, this tree against an older commit's, in one process.

Builds the C++ kernels of ``--base`` (``git show REV:qbackend/kernels/cpu/*``) into a temporary
library beside this tree's, then times ``qbi8_linear`` of both on the same weight descriptors (nf4 b64
nested and int4 g128 affine, the presets' formats) in interleaved rounds: one thread, this thread's
CPU time per call (microseconds, median of the rounds; ctypes call included), and whether the two
outputs are bit-identical. Run under the benchmark lock:

    flock /tmp/qb-bench.lock .venv/bin/python benchmarks/measure_int8_small_m.py --base 8d4de03 \\
        --shapes 1536x384,384x384,384x1536 --ms 1,2,3,4,5
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import _common
import torch

from qbackend.formats import Scheme, quantize
from qbackend.kernels import prepare_weight
from qbackend.kernels.cpu import int8_compute as ic
from qbackend.kernels.cpu._tensors import contig

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {
    "nf4": Scheme("nf4", blocksize=64, nested=True),
    "int4": Scheme("int", bits=4, symmetric=False, blocksize=128),
}


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.qbi8_linear.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int]  # fmt: skip
    lib.qbi8_linear.restype = ctypes.c_int64
    return lib


def base_library(rev: str, out: Path) -> ctypes.CDLL:
    """The kernel library of commit ``rev`` (same compiler and flags as this tree's build)."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "qbackend/kernels/cpu/"],
                           check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
    for name in names:
        if name.endswith((".cpp", ".h")):
            (out / Path(name).name).write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"],
                                                               check=True, capture_output=True).stdout)  # fmt: skip
    return _declare(ctypes.CDLL(str(_common.build_kernel_library(out, out))))


def descriptor(fmt: str, n: int, k: int) -> tuple[ic.QI8W, tuple]:
    """(descriptor, the tensors it points into: keep them alive)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    kw = prepare_weight(quantize(w, FORMATS[fmt]), compute="int8")
    t = kw.tensors
    if fmt == "nf4":
        keep = contig((t[0], t[1], t[2], t[3], t[4], t[6]))
        return ic.codebook_weight(*keep[:5], t[5], keep[5], n, k, kw.statics[2], kw.statics[3]), keep
    keep = contig((t[0], t[1], t[2]))
    return ic.int4_weight(*keep, n, k, kw.statics[2]), keep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD~1", help="the commit to compare with")
    p.add_argument("--shapes", default="1536x384,384x384,384x1536", help="comma list of NxK (out x in)")
    p.add_argument("--ms", default="1,2,3,4,5")
    p.add_argument("--formats", default="nf4,int4")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    this = ic._lib()
    if this is None:
        raise SystemExit("no AVX-512 VNNI build of the CPU kernels here")
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": base_library(args.base, Path(tmp)), "this": _declare(this)}
        print(f"| shape | format | M | {args.base} us | this us | speed-up | bit-identical |")
        print("|---|---|---:|---:|---:|---:|---|")
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            for fmt in args.formats.split(","):
                q, _keep = descriptor(fmt, n, k)
                for m in (int(v) for v in args.ms.split(",")):
                    x = torch.randn(m, k)
                    ys = {name: torch.empty(m, n) for name in libs}
                    for name, lib in libs.items():
                        lib.qbi8_linear(ctypes.byref(q), x.data_ptr(), m, None, ys[name].data_ptr(), 1)
                    same = torch.equal(ys["base"].view(torch.int32), ys["this"].view(torch.int32))
                    calls = max(10, int(4e7 / (m * n * k)))
                    ts: dict[str, list[float]] = {name: [] for name in libs}
                    for r in range(args.rounds):
                        for name in list(libs) if r % 2 == 0 else list(libs)[::-1]:
                            f, yp = libs[name].qbi8_linear, ys[name].data_ptr()
                            t0 = time.thread_time_ns()
                            for _ in range(calls):
                                f(ctypes.byref(q), x.data_ptr(), m, None, yp, 1)
                            ts[name].append((time.thread_time_ns() - t0) / calls / 1e3)
                    b, t = statistics.median(ts["base"]), statistics.median(ts["this"])
                    print(f"| {n}x{k} | {fmt} | {m} | {b:.2f} | {t:.2f} | {b / t:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
