"""Per-call time of a quantized linear on CPU through the module path and the compiled path, with the
prepared kernel calls (``qbackend.kernels.cpu.fast_path``) and without (microseconds, wall / thread CPU).

Module path: a ``QuantizedLinear`` forward under ``no_grad``. Compiled path: ``torch.compile(backend=
"qbackend")`` of a stack of 8 linears (the per-call figure is the graph's time / 8, so it includes
Inductor's wrapper and the per-forward weight-stamp check shared out over the layers; 2 linears for
the big shapes). "kernel" is the
C++ kernel alone through ctypes (its descriptor built once); overhead = path - kernel. Shapes: a tiny
64x64 layer (all overhead) and TinyLlama's attention/FFN layers (2048x2048, 5632x2048) at M = 1 (decode).
"fast off" runs the same tree with the prepared calls switched off (the regular direct kernels: what
the tree did before them, except the output finite check, now in C for both). Run the script under
an older tree (``PYTHONPATH``) for the figures before this change:

    flock /tmp/qb-bench.lock .venv/bin/python benchmarks/measure_call_path.py [--quick]
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import _common
import torch

import qbackend
from qbackend.core.config import QuantConfig
from qbackend.formats import quantize
from qbackend.kernels import compute_policy, direct, ops, prepare_weight
from qbackend.workflows.weight_only import QuantizedLinear

QUICK = "--quick" in sys.argv
LAYERS = 8
SHAPES = ((64, 64), (2048, 2048), (5632, 2048)) if not QUICK else ((64, 64), (2048, 2048))


def _overhead_module():
    spec = importlib.util.spec_from_file_location("_mco", Path(__file__).with_name("measure_call_overhead.py"))
    mod = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, sys.argv[:1]  # it reads the thread count from argv at import
    try:
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    finally:
        sys.argv = argv
    return mod


def bench(fn, n: int) -> tuple[float, float]:
    """(wall, thread CPU) microseconds per call, medians of 7 rounds."""
    return _common.wall_and_cpu_us(fn, n, warmup=max(20, n // 10))


class FastSwitch:
    """Turn the prepared calls off (the regular direct kernels) and back on, for module and compiled code."""

    def __init__(self) -> None:
        self.saved = dict(getattr(ops, "_FAST", {}))

    @property
    def available(self) -> bool:
        return bool(self.saved)

    def set(self, on: bool) -> None:
        if not self.available:
            return
        fast = ops._FAST
        fast.clear()
        if on:
            fast.update(self.saved)
        for (name, dev) in self.saved:
            direct.KERNELS[name] = ops.direct_kernel(name, dev)


def _kernel_call(mco, preset: str, compute: str, kw, x, b, y):
    if preset == "int4" and compute == "fp32":
        import ctypes

        from qbackend.kernels import cpu as kcpu

        q, _keep = kcpu._qw4_int4(*kw.tensors, *kw.statics)
        lib, nt = kcpu.lib(), torch.get_num_threads()
        return lambda: lib.qb4_linear(ctypes.byref(q), x.data_ptr(), 1, b.data_ptr(), y.data_ptr(), nt, 0)
    return mco.kernel_call(preset, compute, kw, x, b, y)


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0]:.1f} / {t[1]:.1f}"


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    mco = _overhead_module()
    switch = FastSwitch()
    states = (False, True) if switch.available else (False,)
    print(f"qbackend from {qbackend.__file__}; prepared calls {'available' if switch.available else 'absent'};"
          f" load average {os.getloadavg()}")  # fmt: skip
    nf4_mode = compute_policy.resolve_weight("auto", "nf4_linear", (2048, 2048, 64, 256), "cpu").mode
    cases = [("nf4", nf4_mode), ("nf4", "fp32"), ("int4", "fp32"), ("int8", "fp32")]
    if nf4_mode == "fp32":
        cases = cases[1:]
    rows = []
    for n, k in SHAPES:
        reps = 1400 if n * k < 1 << 20 else 140
        x = torch.randn(1, k)
        for preset, compute in cases:
            w, b = torch.randn(n, k) * 0.05, torch.randn(n)
            scheme = QuantConfig.preset(preset).scheme
            kw = prepare_weight(quantize(w, scheme))
            module = QuantizedLinear(kw, b, scheme, compute)
            kernel = bench(_kernel_call(mco, preset, compute, kw, x, b, torch.empty(1, n)), reps)
            # the compiled path: LAYERS linears of this shape (square ones chained; others fed x each)
            layers = LAYERS if n * k < 1 << 20 else 2  # big layers: fewer copies (memory, quantizing time)
            stack = torch.nn.ModuleList(torch.nn.Linear(k, n) for _ in range(layers))

            class Stack(torch.nn.Module):
                def __init__(self, layers):
                    super().__init__()
                    self.layers = layers

                def forward(self, x):
                    return [lin(x) for lin in self.layers]

            torch._dynamo.reset()
            opts = {"preset": preset, "compute": compute, "min_params": 0}
            compiled = torch.compile(Stack(stack), backend="qbackend", options=opts, dynamic=False)
            compiled(x)
            cells = {}
            for on in states * 2:  # interleaved: off, on, off, on (the second of each kept)
                switch.set(on)
                mod = bench(lambda module=module, x=x: module(x), reps)
                comp = bench(lambda c=compiled, x=x: c(x), max(20, reps // layers))
                cells[on] = (mod, (comp[0] / layers, comp[1] / layers))
            switch.set(True)
            for on in states:
                mod, comp = cells[on]
                rows.append((f"{n}x{k}", preset, compute, "on" if on else "off", fmt(kernel), fmt(mod),
                             f"{mod[1] - kernel[1]:.1f}", fmt(comp), f"{comp[1] - kernel[1]:.1f}"))  # fmt: skip
    print("| layer (N x K), M=1 | format | compute | prepared calls | kernel (ctypes) | module forward | "
          "module overhead (CPU) | compiled, per linear | compiled overhead (CPU) |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
