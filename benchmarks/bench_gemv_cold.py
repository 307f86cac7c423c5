"""Cold-weight GEMV (M = 1 and small M) of the CPU kernels, A/B between kernel libraries, as bandwidth.

Each (shape, format) is quantized once and copied until the copies hold ``--mb`` MB (far above the
32 MB L3), so every call streams its weight from DRAM. The kernels are called directly through
ctypes (no Python op dispatch), for every library given with ``--lib`` (default: this tree's) and
each compute path: ``int8`` (the VNNI kernels, ``qbi8_linear``) and ``fp32`` (the exact kernels,
``qb4_linear`` / ``qb8_linear``), and for int8 weights ``int16`` (``qbi16_linear8``, what "auto" runs
them in). The machine's streaming read bandwidth (an fp32 ``sum`` over
``--stream-mb``, default 1 GiB) is timed in the same interleaved rounds; figures are medians. Bytes =
codes + block constants.

    python benchmarks/bench_gemv_cold.py                                   # this tree, TinyLlama shapes + 4096^2
    python benchmarks/bench_gemv_cold.py --build-before /tmp/old-tree      # + the library built from an old tree
    python benchmarks/bench_gemv_cold.py --shapes 4096x4096 --formats nf4 --ms 1,8
    python benchmarks/bench_gemv_cold.py --formats int8 --paths int16 --build-before /tmp/old-tree
"""

from __future__ import annotations

import argparse
import ctypes
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import _common
import torch

from qbackend.formats import Scheme, quantize
from qbackend.kernels import prepare_weight
from qbackend.kernels.cpu import _build, int8_compute, int16_compute

SHAPES = ("4096x4096", "2048x2048", "256x2048", "5632x2048", "2048x5632", "32000x2048")  # N x K
SCHEMES = {
    "nf4": Scheme("nf4", bits=4, blocksize=64, nested=True),
    "int4": Scheme("int", bits=4, symmetric=False, blocksize=128),
    "int8": Scheme("int", bits=8, granularity="channel"),
}
STREAM = "stream read (fp32 sum)"


def build_library(tree: Path) -> Path:
    """Compiles the kernel sources of another checkout (``tree`` = its repository root) like _build does,
    into a temporary folder (not into that checkout, where it would show up as a new file)."""
    return _common.build_kernel_library(tree / "qbackend" / "kernels" / "cpu",
                                        Path(tempfile.mkdtemp(prefix="qb-bench-lib-")))


def load_library(path: Path | None) -> ctypes.CDLL:
    lib = _build.load() if path is None else ctypes.CDLL(str(path))
    if path is not None:
        _build._declare(lib)
    qw = ctypes.POINTER(int8_compute.QI8W)
    lib.qbi8_linear.argtypes = [qw, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.qbi8_linear.restype = ctypes.c_int64
    int16_compute.declare(lib)
    return lib


class Layer:
    """One copy of a quantized layer and the ctypes descriptors of both paths."""

    def __init__(self, fmt: str, tensors: tuple, n: int, k: int, statics: tuple[int, ...]) -> None:
        self.keep = tuple(None if t is None else t.clone() for t in tensors)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.keep if t is not None and t.numel() > 256)
        p = [0 if t is None else t.data_ptr() for t in self.keep]
        self.fmt, self.n, self.k = fmt, n, k
        if fmt == "nf4":
            c, a, nc, na, no, tb, nt = p
            bs, nbs = statics[2], statics[3]
            t8, inv_c = int8_compute._table_image(tuple(self.keep[5].tolist()))
            self.qi8 = int8_compute.QI8W(codes=c, absmax=a, ncodes=nc, nabsmax=na, ntable=nt, noffset=no,
                                         lut=(ctypes.c_int8 * 16)(*t8), inv_c=inv_c, kind=0, N=n, K=k, bs=bs,
                                         nbs=nbs, G=0)  # fmt: skip
            self.qw4 = _build.QW4(codes=c, absmax=a, ncodes=nc, nabsmax=na, ntable=nt, table=tb, noffset=no,
                                  layout=_build.CODEBOOK, N=n, K=k, bs=bs, nbs=nbs, G=0)  # fmt: skip
        elif fmt == "int4":
            c, s, z = p
            g = statics[2]
            self.qi8 = int8_compute.QI8W(codes=c, scale=s, zp=z, kind=1, N=n, K=k, bs=g, G=-(-k // g))
            self.qw4 = _build.QW4(codes=c, scale=s, zp=z, layout=_build.INT4, N=n, K=k, bs=g, G=-(-k // g))
        else:
            c, s = p
            self.qi8 = int8_compute.QI8W(codes=c, scale=s, kind=2, N=n, K=k)
            self.codes, self.scale = c, s

    def fn(self, lib: ctypes.CDLL, path: str, x: torch.Tensor, y: torch.Tensor, nt: int) -> Callable[[], None]:
        m, xp, yp = x.shape[0], x.data_ptr(), y.data_ptr()
        if path == "int8":
            ref = ctypes.byref(self.qi8)
            return lambda: lib.qbi8_linear(ref, xp, m, None, yp, nt)
        if path == "int16":  # int8 weights only (what "auto" runs them in)
            n, k, c, s = self.n, self.k, self.codes, self.scale
            return lambda: lib.qbi16_linear8(3, c, s, n, k, xp, m, None, yp, nt, 0)
        if self.fmt == "int8":
            n, k, c, s = self.n, self.k, self.codes, self.scale
            return lambda: lib.qb8_linear(c, s, n, k, xp, m, None, yp, nt, 0)
        ref4 = ctypes.byref(self.qw4)
        return lambda: lib.qb4_linear(ref4, xp, m, None, yp, nt, 0)


def _set_knobs(lib: ctypes.CDLL, knobs: tuple[int, int, int]) -> None:
    lib.qbi8_set_stream(knobs[0], knobs[1])
    lib.qbi8_set_small_nr(knobs[2])


Libs = dict[str, tuple[ctypes.CDLL, tuple[int, int, int] | None]]  # name -> (library, knobs to set first)


def bench(libs: Libs, shape: str, fmt: str, m: int, paths: list[str], mb: float, rounds: int,
          stream: Callable[[], object], stream_bytes: int) -> dict[str, dict[str, float]]:  # fmt: skip
    n, k = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    kw = prepare_weight(quantize(torch.randn(n, k) * 0.02, SCHEMES[fmt]))
    one = Layer(fmt, kw.tensors, n, k, kw.statics)
    n_copies = max(1, math.ceil(mb * 2**20 / one.nbytes))
    copies = [one] + [Layer(fmt, kw.tensors, n, k, kw.statics) for _ in range(n_copies - 1)]
    nt = torch.get_num_threads()
    x = torch.randn(m, k)
    ys = {}
    fns: dict[str, Callable[[], object]] = {}
    for lname, (lib, knobs) in libs.items():
        for path in paths:
            y = torch.empty(m, n)
            calls = [c.fn(lib, path, x, y, nt) for c in copies]
            if knobs is not None:
                calls.insert(0, lambda lib=lib, kb=knobs: _set_knobs(lib, kb))
            fns[f"{lname} {path}"] = lambda calls=calls: [f() for f in calls]
            ys[f"{lname} {path}"] = y
    fns[STREAM] = stream
    times = _common.medians(_common.interleaved(fns, rounds, 2, warmup=1, alternate=True))
    # the libraries must agree (same arithmetic per path: within fp32 summation order)
    for path in paths:
        got = [ys[f"{ln} {path}"] for ln in libs]
        for g in got[1:]:
            d = float((g - got[0]).abs().max() / got[0].abs().max().clamp_min(1e-30))
            if d > 1e-4:
                print(f"# WARNING {shape} {fmt} {path}: results differ between libraries by {d:.2e}", file=sys.stderr)
    sbw = stream_bytes / times[STREAM]
    out = {}
    for name, t in times.items():
        nb = stream_bytes if name == STREAM else len(copies) * one.nbytes
        per = 1 if name == STREAM else len(copies)
        out[name] = {"us_per_layer": 1e6 * t / per, "gbps": nb / t / 1e9, "of_stream": nb / t / sbw}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of NxK")
    p.add_argument("--formats", default="nf4,int4,int8")
    p.add_argument("--paths", default="int8,fp32",
                   help="compute paths: int8 (VNNI), fp32 (exact), int16 (int8 weights only)")
    p.add_argument("--ms", default="1", help="rows of x (comma list)")
    p.add_argument("--mb", type=float, default=256.0, help="weight MB cycled per method")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--build-before", default="", help="also a library compiled from this other checkout ('before')")
    p.add_argument("--lib", action="append", default=[], help="NAME=PATH of another compiled library")
    p.add_argument("--knobs", default="", help="comma list of PF:LANES[:NR]: small-M streaming settings "
                   "(qbi8_set_stream; NR: rows per tile at M = 1, 1 (default), 2 or 4) of this tree's "
                   "library, each its own column")  # fmt: skip
    p.add_argument("--stream-mb", type=float, default=1024.0, help="size of the streaming-read anchor (MB)")
    p.add_argument("--json", default="")
    _common.add_threads_option(p)
    a = p.parse_args(argv)
    _common.apply_threads(a)
    libs: Libs = {}
    if a.build_before:
        libs["before"] = (load_library(build_library(Path(a.build_before))), None)
    for spec in a.lib:
        name, path = spec.split("=", 1)
        libs[name] = (load_library(Path(path)), None)
    this = load_library(None)
    if a.knobs:
        this.qbi8_set_stream.argtypes = [ctypes.c_int, ctypes.c_int]
        for kb in a.knobs.split(","):
            pf, lanes, nr = (int(v) for v in (kb + ":1").split(":")[:3])
            libs[f"pf{pf} lanes{lanes} nr{nr}"] = (this, (pf, lanes, nr))
    else:
        libs["after" if libs else "this"] = (this, None)
    big = torch.ones(int(a.stream_mb * 2**20 / 4))
    stream = big.sum
    print(_common.header(extra=f"{torch.get_num_threads()} threads; weights cycled {a.mb:.0f} MB"), flush=True)
    paths = a.paths.split(",")
    report = {}
    lines = ["| shape NxK | fmt | M | " + " | ".join(f"{ln} {pa} us (GB/s, % stream)" for ln in libs for pa in paths)
             + " | stream GB/s |", "|---|---|---:|" + "---:|" * (len(libs) * len(paths) + 1)]  # fmt: skip
    for shape in a.shapes.split(","):
        for fmt in a.formats.split(","):
            for m in (int(v) for v in a.ms.split(",")):
                r = bench(libs, shape, fmt, m, paths, a.mb, a.rounds, stream, big.numel() * 4)
                report[f"{shape} {fmt} M={m}"] = r
                cells = [f"{r[f'{ln} {pa}']['us_per_layer']:.0f} ({r[f'{ln} {pa}']['gbps']:.1f}, "
                         f"{100 * r[f'{ln} {pa}']['of_stream']:.0f}%)" for ln in libs for pa in paths]  # fmt: skip
                lines.append(f"| {shape} | {fmt} | {m} | " + " | ".join(cells) + f" | {r[STREAM]['gbps']:.1f} |")
                print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    print(f"\n# {_common.load_line('load average at the end')}")
    if a.json:
        _common.write_json(a.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
