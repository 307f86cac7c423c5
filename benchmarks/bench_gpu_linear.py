"""GPU speed of qbackend's Triton quantized linears against bf16 cuBLAS, in one process.

For each weight shape (K_in x N_out) and batch M, times ``F.linear`` in bf16 (cuBLAS) and our
kernels: NF4 + nested constants (block 64, nested 256), INT4 symmetric g128, INT8 per channel and
W8A8 (per-token dynamic activations). Side by side, where they import: bitsandbytes NF4+DQ
(``matmul_4bit``, which runs ``gemv_4bit`` for a single token) and torchao int4 weight-only.
With ``--grad``, also the grad-input kernels of the weight-only formats (QLoRA's backward through a
frozen quantized weight, ``grad_x = grad_y @ W``) against bf16 ``torch.mm(grad_y, W)``.

Timing: ``triton.testing.do_bench`` (median; it clears a 256 MiB buffer before every run, so the
weights come from HBM, not L2), and with CUDA graphs: one graph replaying the call over several
weight copies whose total size is >= 4x the L2 cache (rotation instead of a flush), time per call.
Bandwidth = bytes the call must read (weights with their constants, activations) / eager time, also
as a fraction of the device-to-device copy bandwidth (read + write) measured in the same run.

    python benchmarks/bench_gpu_linear.py                 # the full grid
    python benchmarks/bench_gpu_linear.py --quick         # 8192^2, M in {1, 16}
    python benchmarks/bench_gpu_linear.py --out results.json
    python benchmarks/bench_gpu_linear.py --quick --grad  # + grad-input kernels
    python benchmarks/bench_gpu_linear.py --shapes 8192x8192 --ms 1,4 \
        --formats nf4-nested-old,nf4-nested,nf4-nested-prs,nf4-nested-npf,nf4-nested-tlg,int4-old,int4-glb,int8-old,\
        int8-glb

Format suffixes for the small-M (decode) kernels, switched per call in the same process:
no suffix = the defaults (the wide GEMV where ``linear.WIDE_ROWS`` sends a layout to it: nested
NF4/FP4 at M <= 2, with ``LUT = "global"``); ``-old`` = the previous kernels everywhere
(``linear.WIDE_GEMV = False``); the wide GEMV for every layout at M <= 4 with the NF4/FP4 table looked
up per nibble from global memory (``-glb``), as one 8-byte lookup per code byte from a 256-entry pair
table (``-prs``: ``LUT = "pairs"``), by a register select tree (``-sel``) or by ``tl.gather`` on a
register copy (``-tlg``); ``-npf`` = ``-glb`` without the next-tile prefetch of the 4-bit codes
(``linear.PREFETCH = False``). Nested NF4/FP4 from M = 3 decodes first whatever the suffix, except
with ``-wd``: the wide-K tl.dot kernel for NF4/FP4 at every M <= 64 (``linear.WIDE_DOT_ROWS`` 64, the
wide GEMV off so M = 1-2 take it too) with its heuristic config; ``-wd`` takes optional parts in this
order: a weight tile ``<BLOCK_N>x<BLOCK_K>w<warps>``, ``s<pipeline stages>``, ``p`` for the byte-pair
table (``LUT = "pairs"``) or ``t`` for the select tree (``"select"``), e.g. ``-wds2`` (the heuristic
tile, 2 stages), ``-wds2t``, ``-wd32x256w4p``.
The last command above is the decode A/B; the wide-dot A/B against decode-first is

    python benchmarks/bench_gpu_linear.py --no-autotune --formats bf16,nf4-nested,nf4-nested-wd,nf4-nested-wds2 \
        --ms 2,3,4,8,16,32,64

Without a CUDA GPU it prints why and exits with status 0 having measured nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import _common
import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # (K_in, N_out)
MS = [1, 16, 64, 4096]
FORMATS = ["bf16", "nf4-nested", "int4", "int8", "w8a8", "bnb-nf4-dq", "torchao-int4"]
# Backward through a frozen quantized weight (QLoRA): grad_x = grad_y @ W, against bf16 ``grad_y @ W``.
GRAD_FORMATS = ["bf16-grad", "nf4-nested-grad", "int4-grad", "int8-grad"]

# --dry-run-cpu swaps these: CPU tensors through the Triton interpreter, fp32 (the interpreter gets
# bf16 wrong), tiny shapes, errors only and no timing at all. It checks this script's plumbing.
DEV = "cuda"
ACT = torch.bfloat16
DRY = False


@dataclass
class Row:
    shape: str
    m: int
    fmt: str
    us: float | None  # eager (do_bench, L2 flushed)
    us_graph: float | None  # CUDA graph, weights rotated past L2
    speedup: float | None  # bf16 eager time / this eager time
    speedup_graph: float | None
    gbps: float | None  # bytes read / eager time
    bw_frac: float | None  # of measured copy bandwidth
    rel_err: float | None  # vs bf16 F.linear on the dequantized weight
    note: str = ""


def _copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), the practical HBM ceiling."""
    from triton.testing import do_bench

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * n / (ms * 1e-3)


def _graph_time_us(calls: list[Callable[[], object]], inner: int = 20) -> float:
    """Per-call time of a CUDA graph that runs every call ``inner`` times, in rotation."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm up (compilation, config choice) outside the capture
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            for c in calls:
                c()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (inner * len(calls)))
    return sorted(times)[len(times) // 2]


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Case:
    """One format at one shape: a call per weight copy, the bytes one call moves, a reference output."""

    def __init__(self, fmt: str, k: int, n: int, copies: int) -> None:
        self.grad = fmt.endswith("-grad")  # grad-input direction: the call takes grad_y [M, N]
        fmt = fmt.removesuffix("-grad")
        # Kernel-path suffix (see the module docstring): (WIDE_GEMV, LUT, PREFETCH, wide for every
        # layout, WIDE_DOT_ROWS for codebooks, wide-dot weight tile (BLOCK_N, BLOCK_K, warps) and stages,
        # None for the heuristic's) for this format's calls.
        paths = {
            "-old": (False, "global", True, False, 0, None, None),
            "-glb": (True, "global", True, True, 0, None, None),
            "-prs": (True, "pairs", True, True, 0, None, None),
            "-sel": (True, "select", True, True, 0, None, None),
            "-tlg": (True, "gather", True, True, 0, None, None),
            "-npf": (True, "global", False, True, 0, None, None),
        }  # fmt: skip
        wd = re.search(r"-wd(?:(\d+)x(\d+)w(\d+))?(?:s(\d+))?([pt]?)$", fmt)
        if wd:
            tile = tuple(int(v) for v in wd.group(1, 2, 3)) if wd.group(1) else None
            stages = int(wd.group(4)) if wd.group(4) else None
            lut = {"p": "pairs", "t": "select"}.get(wd.group(5), "global")
            paths[wd.group(0)] = (False, lut, True, False, 64, tile, stages)
        sfx = next((s for s in paths if fmt.endswith(s)), "")
        self.path = paths.get(sfx)
        self.fmt, self.k, self.n = fmt.removesuffix(sfx) if sfx else fmt, k, n
        self.weights: list[tuple] = []
        self.w_bytes = 0
        w = torch.randn(n, k, device=DEV, dtype=ACT) * 0.02
        for i in range(copies):
            wi = w if i == 0 else w.roll(i, dims=1)  # distinct memory, same statistics
            self.weights.append(self._make(wi))
        self.dequant = self._dequant(self.weights[0])

    # -- per format ------------------------------------------------------------------------------
    def _make(self, w: torch.Tensor) -> tuple:
        from qbackend.formats import Scheme, quantize
        from qbackend.formats.codebooks import code_table

        f = self.fmt
        if f == "bf16":
            self.w_bytes = _bytes(w)
            return (w.contiguous(),)
        if f == "nf4-nested":
            q = quantize(w, Scheme("nf4", blocksize=64, nested=True, nested_blocksize=256))
            nc = q.nested
            self.w_bytes = _bytes(q.codes) + _bytes(nc.codes) + _bytes(nc.absmax2) + 4
            return (q.codes, None, nc.codes, nc.absmax2, nc.offset, code_table("nf4", DEV),
                    code_table("dynamic", DEV))  # fmt: skip
        if f == "int4":
            q = quantize(w, Scheme("int", bits=4, symmetric=True, blocksize=128))
            self.w_bytes = _bytes(q.codes) + _bytes(q.scale)
            return (q.codes, q.scale, None)
        if f in ("int8", "w8a8"):
            q = quantize(w, Scheme("int", bits=8, granularity="channel"))
            self.w_bytes = _bytes(q.codes) + _bytes(q.scale)
            return (q.codes, q.scale)
        if f == "bnb-nf4-dq":
            import bitsandbytes.functional as bf

            packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            self.w_bytes = _bytes(packed) + _bytes(state.absmax) + _bytes(state.state2.absmax) + 4
            return (packed, state)
        if f == "torchao-int4":
            return (self._torchao(w),)
        raise ValueError(f)

    def _torchao(self, w: torch.Tensor) -> torch.nn.Module:
        import torchao.quantization as tq

        lin = torch.nn.Linear(self.k, self.n, bias=False, device=DEV, dtype=ACT)
        lin.weight.data.copy_(w)
        if hasattr(tq, "Int4WeightOnlyConfig"):
            tq.quantize_(lin, tq.Int4WeightOnlyConfig(group_size=128))
        else:
            tq.quantize_(lin, tq.int4_weight_only(group_size=128))
        self.w_bytes = self.n * self.k // 2 + self.n * (self.k // 128) * 4  # codes + bf16 scale/zero per group
        return lin

    def _dequant(self, ops: tuple) -> torch.Tensor | None:
        from qbackend.kernels import reference as R

        f, n, k = self.fmt, self.n, self.k
        if f == "bf16":
            return ops[0].float()
        if f == "nf4-nested":
            return R.decode_codebook(*ops, n, k, 64, 256)
        if f == "int4":
            return R.decode_int4(*ops, n, k, 128)
        if f in ("int8", "w8a8"):
            return ops[0].view(n, k).float() * ops[1].view(-1, 1)
        if f == "bnb-nf4-dq":
            import bitsandbytes.functional as bf

            return bf.dequantize_4bit(ops[0], ops[1]).float()
        return None

    def input(self, m: int) -> torch.Tensor:
        """The call's activation: x [M, K], or grad_y [M, N] for the grad-input direction."""
        return torch.randn(m, self.n if self.grad else self.k, device=DEV, dtype=ACT)

    def reference(self, x: torch.Tensor) -> torch.Tensor | None:
        """fp32 result with the dequantized weight (what the call should compute)."""
        if self.dequant is None:
            return None
        return x.float() @ self.dequant if self.grad else F.linear(x.float(), self.dequant)

    def call(self, i: int, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        fn = self._call(i, x)
        if self.path is None:
            return fn
        from qbackend.kernels.triton import autotune as at
        from qbackend.kernels.triton import linear as L

        wide, lut, prefetch, every, dot_rows, tile, stages = self.path
        rows = dict.fromkeys(L.WIDE_ROWS, at.WIDE_M_MAX) if every else L.WIDE_ROWS
        dot = {L.CODEBOOK: dot_rows}
        cfg = None
        if tile is not None or stages is not None:  # pinned wide-dot tile / stages (the heuristic's split-K)
            m, sms = x.shape[0], 1 if DRY else at.sm_count(x.device)
            tile = tile or at.dot_wide_tile(m, ACT == torch.float32)
            cfg = at.dot_wide_config(m, self.n, self.k, *tile, sms, stages or 1)

        def switched() -> torch.Tensor:
            old = L.WIDE_GEMV, L.LUT, L.PREFETCH, L.WIDE_ROWS, L.WIDE_DOT_ROWS
            L.WIDE_GEMV, L.LUT, L.PREFETCH, L.WIDE_ROWS, L.WIDE_DOT_ROWS = wide, lut, prefetch, rows, dot
            try:
                with contextlib.nullcontext() if cfg is None else at.override_config(at.DOT_WIDE, cfg):
                    return fn()
            finally:
                L.WIDE_GEMV, L.LUT, L.PREFETCH, L.WIDE_ROWS, L.WIDE_DOT_ROWS = old

        return switched

    def _call(self, i: int, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        from qbackend.kernels import triton as T

        ops, f, n, k = self.weights[i], self.fmt, self.n, self.k
        if self.grad:
            if f == "bf16":
                return lambda: torch.mm(x, ops[0])
            if f == "nf4-nested":
                return lambda: T.codebook_linear_grad_input(x, *ops, n, k, 64, 256)
            if f == "int4":
                return lambda: T.int4_linear_grad_input(x, *ops, n, k, 128)
            if f == "int8":
                return lambda: T.int8_linear_grad_input(x, *ops, n, k)
            raise ValueError(f"{f}-grad")
        if f == "bf16":
            return lambda: F.linear(x, ops[0])
        if f == "nf4-nested":
            return lambda: T.codebook_linear(x, *ops, None, n, k, 64, 256)
        if f == "int4":
            return lambda: T.int4_linear(x, *ops, None, n, k, 128)
        if f == "int8":
            return lambda: T.int8_linear(x, *ops, None, n, k)
        if f == "w8a8":
            return lambda: T.w8a8_linear(x, *ops, None, None, n, k)
        if f == "bnb-nf4-dq":
            import bitsandbytes as bnb

            packed, state = ops
            # matmul_4bit dispatches a single token (no grad) to gemv_4bit, else dequantize + matmul.
            return lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)
        if f == "torchao-int4":
            return lambda: ops[0](x)
        raise ValueError(f)


def _l2_bytes() -> int:
    try:
        return int(torch.cuda.get_device_properties(0).L2_cache_size)
    except AttributeError:
        return 50 << 20


def run(shapes: list[tuple[int, int]], ms: list[int], formats: list[str], graphs: bool) -> list[Row]:
    from triton.testing import do_bench

    bw = None
    if DRY:
        print("dry run on CPU through the Triton interpreter: correctness only, no timings", flush=True)
    else:
        bw = _copy_bandwidth()
        print(f"device: {torch.cuda.get_device_name(0)}; copy bandwidth {bw / 1e9:.0f} GB/s (read+write)", flush=True)
    rows: list[Row] = []
    for k, n in shapes:
        shape = f"{k}x{n}"
        # Enough weight copies that one graph replay streams >= 4x L2 of the smallest (4-bit) weights.
        copies = max(1, math.ceil(4 * _l2_bytes() / (n * k * 0.5))) if graphs else 1
        cases: dict[str, Case | str] = {}
        for f in formats:
            try:
                cases[f] = Case(f, k, n, copies)
            except Exception as e:  # noqa: BLE001 - an optional library missing or failing: report, go on
                cases[f] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        for m in ms:
            base: dict[bool, tuple[float | None, float | None]] = {}  # direction -> bf16 (eager, graph) us
            for f in formats:
                c = cases[f]
                if isinstance(c, str):
                    rows.append(Row(shape, m, f, None, None, None, None, None, None, None, c))
                    continue
                try:
                    x = c.input(m)
                    fn = c.call(0, x)
                    y = fn()
                    r = c.reference(x)
                    err = None if r is None else ((y.float() - r).norm() / r.norm()).item()
                    us = usg = None
                    if not DRY:
                        us = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                    if graphs and not DRY:
                        usg = _graph_time_us([c.call(i, x) for i in range(len(c.weights))])
                except Exception as e:  # noqa: BLE001
                    rows.append(Row(shape, m, f, None, None, None, None, None, None, None, f"failed: {e!r}"[:120]))
                    continue
                if c.fmt == "bf16":
                    base[c.grad] = (us, usg)
                base_us, base_graph = base.get(c.grad, (None, None))
                # Bytes the call must read (weights with their constants, activations) per the issue's
                # definition; the output write is left out (tiny at small M).
                moved = c.w_bytes + _bytes(x)
                gbps = None if us is None else moved / (us * 1e-6) / 1e9
                note = f"bf16 vs fp32: {err:.1e}" if c.fmt == "bf16" and err is not None else ""
                rows.append(Row(
                    shape, m, f, us, usg,
                    None if (base_us is None or us is None) else base_us / us,
                    None if (base_graph is None or usg is None) else base_graph / usg,
                    gbps, None if (gbps is None or bw is None) else gbps * 1e9 / bw,
                    None if c.fmt == "bf16" else err, note,
                ))  # fmt: skip
                r = rows[-1]
                pct = None if r.bw_frac is None else 100 * r.bw_frac
                print(
                    f"{shape:>12} M={m:<5} {f:<15} {_f(r.us, 8, 1)} us {_f(r.speedup, 6, 2)}x | graph "
                    f"{_f(r.us_graph, 8, 1)} us {_f(r.speedup_graph, 6, 2)}x | {_f(r.gbps, 6, 0)} GB/s "
                    f"({_f(pct, 3, 0)}%) err {_f(r.rel_err, 8, 1, 'e')} {r.note}",
                    flush=True,
                )
        del cases
        if not DRY:
            torch.cuda.empty_cache()
    return rows


def _f(v: float | None, w: int, p: int, kind: str = "f") -> str:
    return _common.fmt(v, f"{w}.{p}{kind}", missing="-".rjust(w))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8192^2 only, M in {1, 16}")
    ap.add_argument(
        "--formats", default=",".join(FORMATS),
        help=f"comma list from {FORMATS + GRAD_FORMATS}; weight-only ones also take -old/-glb/-sel/-tlg/-npf/-wd...",
    )  # fmt: skip
    ap.add_argument("--grad", action="store_true", help=f"also time the grad-input kernels ({', '.join(GRAD_FORMATS)})")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="", help="comma list of KxN (default: all four; --quick: 8192x8192)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--out", default="", help="write all rows as JSON here")
    ap.add_argument("--no-autotune", action="store_true", help="heuristic configs (no tuning on first use)")
    ap.add_argument("--dry-run-cpu", action="store_true", help="check the plumbing on CPU (interpreter), no timings")
    args = ap.parse_args(argv)
    if args.dry_run_cpu:
        global DEV, ACT, DRY
        os.environ.setdefault("TRITON_INTERPRET", "1")
        DEV, ACT, DRY = "cpu", torch.float32, True
        formats = [f for f in args.formats.split(",") if f] + (GRAD_FORMATS if args.grad else [])
        rows = run([(96, 64), (75, 40)], [1, 3, 80], formats, graphs=False)
        bad = [r for r in rows if r.rel_err is not None and r.fmt not in ("w8a8", "bf16") and r.rel_err > 1e-4]
        print(f"dry run: {len(rows)} rows, {len(bad)} with an error above 1e-4 (W8A8 excluded: activation rounding)")
        return 1 if bad else 0
    if not torch.cuda.is_available():
        print("bench_gpu_linear: no CUDA GPU is available on this machine; nothing was measured.")
        return 0
    shapes = [(8192, 8192)] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]  # type: ignore[misc]
    ms = [1, 16] if args.quick else [int(v) for v in args.ms.split(",")]
    formats = [f for f in args.formats.split(",") if f] + (GRAD_FORMATS if args.grad else [])
    if "bf16" not in formats:
        formats.insert(0, "bf16")  # every ratio is to bf16 F.linear in this same run
    if any(f.endswith("-grad") for f in formats) and "bf16-grad" not in formats:
        formats.insert(formats.index(next(f for f in formats if f.endswith("-grad"))), "bf16-grad")
    if args.no_autotune:
        os.environ["QBACKEND_TRITON_AUTOTUNE"] = "0"
    from qbackend.kernels.triton import autotune

    print(_common.header())
    state = "on" if autotune.autotune_enabled() else "off"
    print(f"autotune {state}; config cache {autotune.cache_file(torch.device('cuda'))}")
    rows = run(shapes, ms, formats, graphs=not args.no_graphs)
    if args.out:
        _common.write_json(args.out, [asdict(r) for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
