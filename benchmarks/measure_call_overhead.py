"""Per-call cost of each layer of a quantized op's call stack on CPU (microseconds: wall / this thread's CPU time).

From the outside in: ``torch.ops`` call (the dispatcher, custom_op's Python autograd layer, the
registered kernel), the registered kernel (argument binding + validation + the CPU wrapper), a
``QuantizedLinear`` forward under ``no_grad`` (validation + the kernel, no dispatcher), the direct
kernel that Inductor's generated code calls (:mod:`qbackend.kernels.direct`: the CPU wrapper and the
finite-output check), the CPU wrapper of :mod:`qbackend.kernels.cpu` alone, the C++ kernel through
ctypes alone, and fp32 ``F.linear``; on a tiny layer (where everything but the kernel is overhead)
and a MiniLM-sized one.
CPU time is the steadier figure on a shared machine. Run under the benchmark lock:

    flock /tmp/qb-bench.lock .venv/bin/python benchmarks/measure_call_overhead.py [threads, default 1]
"""

import ctypes
import os
import statistics
import sys
import time

import torch

import qbackend
from qbackend.core.config import QuantConfig
from qbackend.formats import quantize
from qbackend.kernels import cpu as kcpu
from qbackend.kernels import direct, families, ops, prepare_weight
from qbackend.workflows.weight_only import QuantizedLinear

print("qbackend from", qbackend.__file__, "; load average", os.getloadavg())
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)


SHAPES = ((64, 64, 1), (1536, 384, 16))  # N, K, M: a tiny layer (all overhead) and MiniLM's FFN up-projection
COLUMNS = ("torch.ops call", "registered kernel (bind + validate + wrapper)", "module forward (no_grad)",
           "direct kernel (compiled code)", "CPU wrapper", "C++ kernel (ctypes)", "fp32 F.linear")  # fmt: skip


def bench(fn, n: int = 2000) -> str:
    """``wall / thread CPU`` microseconds per call, medians of 7 rounds."""
    for _ in range(100):
        fn()
    walls, cpus = [], []
    per = n // 7
    for _ in range(7):
        t, c = time.perf_counter(), time.thread_time()
        for _ in range(per):
            fn()
        walls.append((time.perf_counter() - t) / per * 1e6)
        cpus.append((time.thread_time() - c) / per * 1e6)
    return f"{statistics.median(walls):.1f} / {statistics.median(cpus):.1f}"


def kernel_call(preset, kw, x, b, y):
    """The C++ kernel alone, through ctypes."""
    lib, (m, n), nt = kcpu.lib(), y.shape, torch.get_num_threads()
    if preset == "nf4":
        q, _keep = kcpu._qw4_codebook(*kw.tensors, *kw.statics)
        return lambda: lib.qb4_linear(ctypes.byref(q), x.data_ptr(), m, b.data_ptr(), y.data_ptr(), nt, 0)
    codes, scale = kw.tensors
    k = x.shape[1]
    return lambda: lib.qb8_linear(codes.data_ptr(), scale.data_ptr(), n, k, x.data_ptr(), m, b.data_ptr(),
                                  y.data_ptr(), nt, 0)  # fmt: skip


def main() -> None:
    rows = []
    with torch.no_grad():
        for n, k, m in SHAPES:
            w, b, x = torch.randn(n, k) * 0.05, torch.randn(n), torch.randn(m, k)
            for preset in ("nf4", "int8"):
                scheme = QuantConfig.preset(preset).scheme
                kw = prepare_weight(quantize(w, scheme))
                args = (x, *kw.tensors, b, *kw.statics, "fp32")
                module = QuantizedLinear(kw, b, scheme, "fp32")
                direct_fn = direct.KERNELS[kw.op._opname]
                fam = families.by_op_name(kw.op._opname)[0]
                fn = getattr(kcpu, f"{fam.kernel}_linear")
                checked = ops.checked(fam, fn)
                op = kw.op
                cells = [
                    bench(lambda op=op, args=args: op(*args)),
                    bench(lambda c=checked, args=args: c(*args)),
                    bench(lambda module=module, x=x: module(x)),
                    bench(lambda d=direct_fn, args=args: d(*args[:-1], compute="fp32")),
                    bench(lambda fn=fn, args=args: fn(*args)),
                    bench(kernel_call(preset, kw, x, b, torch.empty(m, n))),
                    bench(lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b)),
                ]
                rows.append((f"{n}x{k} M={m}", preset, *cells))
    print("| layer | format | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---:|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
