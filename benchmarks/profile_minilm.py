"""Where a compiled, quantized MiniLM call spends its time (the demo's rows; torch.profiler).

Builds the demo's row (``quantized_module`` + ``torch.compile(backend="qbackend", dynamic=False)``,
or fp32 Inductor with ``--preset fp32``), runs it at one batch size, and prints:

* what Inductor's generated code calls per forward: fused C++ kernels, our direct kernel calls,
  library (extern) kernels, and Python wrapper lines;
* torch.profiler's table of the ops of a few calls (self CPU time; Inductor's C++ kernels are
  recorded with ``cpp.enable_kernel_profile``; our direct kernels are wrapped in ``record_function``
  for this run only);
* the call's total time against the sum of what the profiler saw (the rest is Python: Dynamo's
  guards, AOT's runtime wrappers, Inductor's Python wrapper).

    .venv/bin/python benchmarks/profile_minilm.py [--preset nf4] [--batch 1] [--threads 1]
        [--options '{"freezing": true}']   # Inductor config patches of the compiled row
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

import _common
import torch

from qbackend.demo.minilm import load_minilm, pooled_embeddings
from qbackend.demo.run import _quantized
from qbackend.demo.sentences import EVALUATION_SENTENCES
from qbackend.kernels import direct


def build(ml, preset: str, options: dict) -> torch.nn.Module:
    if preset == "fp32":
        return torch.compile(ml.model, dynamic=False, options=options or None)
    make = _quantized(ml.model, preset, True, "auto", ml)
    model = make()
    if options:  # the same row with Inductor options (a fresh compile)
        model = torch.compile(model._orig_mod, backend="qbackend", dynamic=False, options={"inductor": options})
    return model


def count_code(code: str) -> dict[str, int]:
    """Calls per forward in Inductor's generated Python wrapper."""
    call_body = code.split("def call(", 1)[-1]
    return {
        "C++ kernels (cpp_fused_*)": len(re.findall(r"^\s+cpp_fused_\w+\(", call_body, re.M)),
        "qbackend direct kernels": len(re.findall(r"_qbackend_kernels\[", call_body)),
        "library kernels (extern_kernels / torch.ops)": len(
            re.findall(r"^\s+(?:\w+ = )?(?:extern_kernels\.\w+|torch\.ops\.\w+\.\w+)", call_body, re.M)
        ),
        "size/stride asserts (of graph inputs)": len(re.findall(r"assert_size_stride\(\w+, .*'input'\)", call_body)),
        "size/stride asserts (of kernel outputs)": len(re.findall(r"assert_size_stride\(", call_body))
        - len(re.findall(r"assert_size_stride\(\w+, .*'input'\)", call_body)),
        "buffer allocations (empty_strided)": len(re.findall(r"empty_strided", call_body)),
        "wrapper lines": len([ln for ln in call_body.splitlines() if ln.strip() and not ln.strip().startswith("#")]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nf4", help="nf4, int8, w8a8, ... or fp32 (fp32 Inductor)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--options", default="{}", help="Inductor config patches (JSON)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--code", help="write the generated code to this file")
    _common.add_threads_option(p)
    args = p.parse_args(argv)
    _common.apply_threads(args)
    torch._inductor.config.cpp.enable_kernel_profile = True
    ml = load_minilm()
    batch = ml.tokenize(list(EVALUATION_SENTENCES)[: args.batch])
    model = build(ml, args.preset, json.loads(args.options))
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad():
        _, codes = run_and_get_code(lambda: pooled_embeddings(model, batch))
        code = "\n".join(codes)
        if args.code:
            with open(args.code, "w") as f:
                f.write(code)
        for _ in range(10):
            pooled_embeddings(model, batch)
        walls, cpus = [], []
        for _ in range(args.calls):
            t, c = time.perf_counter(), time.thread_time()
            pooled_embeddings(model, batch)
            walls.append(time.perf_counter() - t)
            cpus.append(time.thread_time() - c)
        # our direct kernels are Python functions: name them for the profiler (this run only)
        originals = dict(direct.KERNELS)
        for name, fn in originals.items():
            def traced(*a, _fn=fn, _name=name, **k):
                with torch.profiler.record_function(f"qbackend::{_name} (direct)"):
                    return _fn(*a, **k)
            direct.KERNELS[name] = traced
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                with torch.profiler.record_function("## forward ##"):
                    pooled_embeddings(model, batch)
        direct.KERNELS.update(originals)
    print(_common.header(extra=f"{args.preset}, batch {args.batch} ({batch['input_ids'].shape[1]} tokens), "
                               f"threads {torch.get_num_threads()}, options {args.options}"))
    print(f"\nper call: wall {1e3 * statistics.median(walls):.3f} ms, this thread's CPU "
          f"{1e3 * statistics.median(cpus):.3f} ms (median of {args.calls}, outside the profiler)\n")
    print("| generated code, per forward | count |\n|---|---:|")
    for k, v in count_code(code).items():
        print(f"| {k} | {v} |")
    events = prof.key_averages()
    fwd = next(e for e in events if e.key == "## forward ##")
    print(f"\nprofiled forward: {fwd.cpu_time_total / args.calls / 1e3:.3f} ms per call (profiler overhead included)\n")
    rows = sorted((e for e in events if e.key != "## forward ##"), key=lambda e: -e.self_cpu_time_total)
    print("| op (self CPU) | calls per forward | us per forward | us per call |\n|---|---:|---:|---:|")
    for e in rows[: args.top]:
        print(f"| {e.key[:70]} | {e.count / args.calls:.0f} | {e.self_cpu_time_total / args.calls:.1f} | "
              f"{e.self_cpu_time_total / max(e.count, 1):.1f} |")
    total_self = sum(e.self_cpu_time_total for e in rows) / args.calls
    print(f"\nsum of recorded self times: {total_self / 1e3:.3f} ms per forward; forward "
          f"{fwd.cpu_time_total / args.calls / 1e3:.3f} ms; unrecorded (Python) "
          f"{(fwd.cpu_time_total / args.calls - total_self) / 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
