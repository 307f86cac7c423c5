"""Per-call cost of each layer of a quantized op's call stack on CPU (microseconds: wall / this thread's CPU time).

From the outside in: ``torch.ops`` call (the dispatcher, custom_op's Python autograd layer, the
registered kernel), the registered kernel (argument binding + validation + the CPU wrapper), a
``QuantizedLinear`` forward under ``no_grad`` (validation + the kernel, no dispatcher), the direct
kernel that Inductor's generated code calls (:mod:`qbackend.kernels.direct`: the CPU wrapper and the
finite-output check), the CPU wrapper of the compute mode alone, the C++ kernel through ctypes
alone (descriptor built once), and fp32 ``F.linear``; on a tiny layer (where everything but the
kernel is overhead) and MiniLM's layers at M = 10 (batch 1 of the demo's sentences) and 16.
Rows: nf4 in the compute mode the demo's "auto" runs (int8 on a VNNI CPU) and fp32, int8 (fp32
compute) and w8a8 (per-token activations). CPU time is the steadier figure on a shared machine.
Run under the benchmark lock:

    flock /tmp/qb-bench.lock .venv/bin/python benchmarks/measure_call_overhead.py [threads, default 1] [--quick]
"""

import ctypes
import os
import sys

import _common
import torch

import qbackend
from qbackend.core.config import QuantConfig
from qbackend.formats import quantize
from qbackend.kernels import compute_policy, direct, families, ops, prepare_weight
from qbackend.kernels import cpu as kcpu
from qbackend.kernels.cpu import int8_compute
from qbackend.kernels.cpu import w8a8 as kw8a8
from qbackend.workflows.weight_only import QuantizedLinear

print("qbackend from", qbackend.__file__, "; load average", os.getloadavg())
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 1)
QUICK = "--quick" in sys.argv

# N, K, M: a tiny layer (all overhead) and MiniLM's layers at batch 1 (M = 10) and its FFN at M = 16
SHAPES = ((64, 64, 1), (384, 384, 10), (1536, 384, 10), (384, 1536, 10), (1536, 384, 16))
if QUICK:
    SHAPES = ((64, 64, 1), (1536, 384, 10))
COLUMNS = ("torch.ops call", "registered kernel (bind + validate + wrapper)", "module forward (no_grad)",
           "direct kernel (compiled code)", "CPU wrapper", "C++ kernel (ctypes)", "fp32 F.linear")  # fmt: skip


def bench(fn, n: int = 1400) -> str:
    """``wall / thread CPU`` microseconds per call, medians of 7 rounds."""
    wall, cpu = _common.wall_and_cpu_us(fn, n)
    return f"{wall:.1f} / {cpu:.1f}"


def kernel_call(preset, compute, kw, x, b, y):
    """The C++ kernel alone, through ctypes (its descriptor built once)."""
    lib, (m, n), nt = kcpu.lib(), y.shape, torch.get_num_threads()
    k = x.shape[1]
    if compute == "int8":
        L = int8_compute._lib()
        c = kw.tensors
        if preset == "nf4":
            lut, inv_c = int8_compute._table_image(tuple(c[5].tolist()))
            q = int8_compute.QI8W(codes=c[0].data_ptr(), absmax=None, ncodes=c[2].data_ptr(),
                                  nabsmax=c[3].data_ptr(), ntable=c[6].data_ptr(), noffset=c[4].data_ptr(),
                                  lut=(ctypes.c_int8 * 16)(*lut), inv_c=inv_c, kind=int8_compute.KIND_CODEBOOK,
                                  N=n, K=k, bs=kw.statics[2], nbs=kw.statics[3], G=0)  # fmt: skip
        else:
            q = int8_compute.QI8W(codes=c[0].data_ptr(), scale=c[1].data_ptr(), kind=int8_compute.KIND_INT8, N=n, K=k)
        ref = ctypes.byref(q)
        return lambda: L.qbi8_linear(ref, x.data_ptr(), m, b.data_ptr(), y.data_ptr(), nt)
    if preset == "w8a8":
        L = kw8a8._lib()
        codes, scale = kw
        packed = kw8a8.packed_weight(codes, n, k)  # what the op's calls use (its canonical kernel without it)
        if packed is not None:
            return lambda: L.qbw8_linear_packed(x.data_ptr(), m, k, packed.data_ptr(), scale.data_ptr(), n,
                                                b.data_ptr(), None, y.data_ptr(), nt)  # fmt: skip
        return lambda: L.qbw8_linear(x.data_ptr(), m, k, codes.data_ptr(), scale.data_ptr(), n, b.data_ptr(), None,
                                     y.data_ptr(), nt)  # fmt: skip
    if preset == "nf4":
        q, _keep = kcpu._qw4_codebook(*kw.tensors, *kw.statics)
        return lambda: lib.qb4_linear(ctypes.byref(q), x.data_ptr(), m, b.data_ptr(), y.data_ptr(), nt, 0)
    codes, scale = kw.tensors
    return lambda: lib.qb8_linear(codes.data_ptr(), scale.data_ptr(), n, k, x.data_ptr(), m, b.data_ptr(),
                                  y.data_ptr(), nt, 0)  # fmt: skip


def weight_only_cells(preset, compute, w, b, x):
    n, k = w.shape
    m = x.shape[0]
    scheme = QuantConfig.preset(preset).scheme
    kw = prepare_weight(quantize(w, scheme))
    args = (x, *kw.tensors, b, *kw.statics, compute)
    module = QuantizedLinear(kw, b, scheme, compute)
    direct_fn = direct.KERNELS[kw.op._opname]
    fam = families.by_op_name(kw.op._opname)[0]
    if compute == "fp32":
        fn = getattr(kcpu, f"{fam.kernel}_linear")
        wrapper = (lambda fn=fn, args=args: fn(*args))
    else:
        fn = getattr(int8_compute, f"{fam.kernel}_linear")
        wrapper = (lambda fn=fn, args=args: fn(*args[:-1]))
    checked = ops.checked(fam, getattr(kcpu, f"{fam.kernel}_linear"))
    op = kw.op
    return [
        bench(lambda op=op, args=args: op(*args)),
        bench(lambda c=checked, args=args: c(*args)),
        bench(lambda module=module, x=x: module(x)),
        bench(lambda d=direct_fn, args=args: d(*args)),
        bench(wrapper),
        bench(kernel_call(preset, compute, kw, x, b, torch.empty(m, n))),
    ]


def w8a8_cells(w, b, x):
    n, k = w.shape
    m = x.shape[0]
    scale = w.abs().amax(dim=1) / 127
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)
    args = (x, codes, scale, b, None, n, k)
    op = torch.ops.qbackend.w8a8_linear.default
    direct_fn = direct.KERNELS["w8a8_linear"]
    fam = families.by_op_name("w8a8_linear")[0]
    checked = ops.checked(fam, kcpu.w8a8_linear)
    return [
        bench(lambda: op(*args)),
        bench(lambda: checked(*args)),
        "-",
        bench(lambda: direct_fn(*args)),
        bench(lambda: kw8a8.w8a8_linear(*args)),
        bench(kernel_call("w8a8", "fp32", (codes, scale), x, b, torch.empty(m, n))),
    ]


def main() -> None:
    rows = []
    nf4_mode = compute_policy.resolve_weight("auto", "nf4_linear", (384, 384, 64, 256), "cpu").mode
    with torch.no_grad():
        for n, k, m in SHAPES:
            w, b, x = torch.randn(n, k) * 0.05, torch.randn(n), torch.randn(m, k)
            flin = bench(lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b))
            cases = [("nf4", nf4_mode), ("nf4", "fp32"), ("int8", "fp32")] if nf4_mode != "fp32" else [
                ("nf4", "fp32"), ("int8", "fp32")]  # fmt: skip
            for preset, compute in cases:
                rows.append((f"{n}x{k} M={m}", preset, compute, *weight_only_cells(preset, compute, w, b, x), flin))
            if kw8a8.available():
                rows.append((f"{n}x{k} M={m}", "w8a8", "int8", *w8a8_cells(w, b, x), flin))
    print("| layer (N x K) | format | compute | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---:|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
