"""Inductor's CPU options on the whole real MiniLM, quantized: which help the rest of the graph.

all-MiniLM-L6-v2 (the demo's model) at batch 1 and 32 (demo sentences), median ms per call of
``model(**batch)`` and the ratio to fp32 eager PyTorch, for: fp32 eager, fp32 Inductor, and the
quantized model (``qbackend.quantize_`` then ``torch.compile(backend="qbackend")``) with Inductor's
defaults, ``cpp_wrapper``, ``freezing``, both, and the non-linear parts in bf16 (the model cast to
bf16; the quantized ops take and return bf16). Every variant is compiled first; then the timing
rounds are interleaved (one call of each variant per round) under ``flock /tmp/qb-bench.lock``
so that other timing jobs on the machine wait.

    .venv/bin/python benchmarks/bench_minilm_inductor.py [--preset nf4] [--compute auto] [--rounds 30] [--quick]
        [--threads 1 --clock cpu]   # CPU time of the one thread: steadier than wall time on a loaded machine
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import _common
import torch

import qbackend
from qbackend.demo.minilm import embedding_quality, load_minilm, pooled_embeddings
from qbackend.demo.run import _quantized
from qbackend.demo.sentences import EVALUATION_SENTENCES

LOCK = "/tmp/qb-bench.lock"


@contextlib.contextmanager
def bench_lock() -> Iterator[None]:
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def variants(ml, preset: str, compute: str, extra: dict[str, dict]) -> dict[str, Callable[[], torch.nn.Module]]:
    """Variant name -> a function building it (compiled). ``extra``: more variants, name -> Inductor patches."""
    base = ml.model

    def quantized(patches: dict, dtype: torch.dtype = torch.float32) -> Callable[[], torch.nn.Module]:
        def make() -> torch.nn.Module:
            if dtype is torch.float32:  # the demo's row: quantized_module (w8a8 calibrated as the demo does)
                m = _quantized(base, preset, False, compute, ml)()
            else:
                m = copy.deepcopy(base).to(dtype)
                qbackend.quantize_(m, {"preset": preset, "compute": compute})
            return torch.compile(m, backend="qbackend", dynamic=False, options={"inductor": patches})

        return make

    out = {
        "fp32 eager": lambda: base,
        "fp32 Inductor": lambda: torch.compile(base, dynamic=False),
        f"{preset} default": quantized({}),
        f"{preset} cpp_wrapper": quantized({"cpp_wrapper": True}),
        f"{preset} freezing": quantized({"freezing": True}),
        f"{preset} cpp_wrapper+freezing": quantized({"cpp_wrapper": True, "freezing": True}),
        f"{preset} bf16 rest of graph": quantized({}, torch.bfloat16),
        f"{preset} bf16 rest + freezing": quantized({"freezing": True}, torch.bfloat16),
        f"{preset} max_autotune": quantized({"max_autotune": True}),
    }
    for name, patches in extra.items():
        out[f"{preset} {name}"] = quantized(patches)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nf4")
    p.add_argument("--compute", default="auto")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--only", help="comma-separated variant names (default: all)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help='another variant (named "<preset> NAME"; no "=" or "," in NAME): Inductor patches, '
                        'e.g. \'threads1={"cpp.threads": 1}\'')  # fmt: skip
    p.add_argument("--quick", action="store_true", help="batch 1, fp32 eager / nf4 default / nf4 freezing, 5 rounds")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: this thread's CPU time (needs --threads 1)")  # fmt: skip
    _common.add_threads_option(p)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.rounds = "1", 5
        args.only = args.only or f"fp32 eager,{args.preset} default,{args.preset} freezing"
    if args.variant and args.only:
        args.only += "," + ",".join(f"{args.preset} {v.split('=', 1)[0]}" for v in args.variant)
    _common.apply_threads(args)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures this thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    # every variant compiles the same forward code once per batch shape: keep them all compiled
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    mini = load_minilm()
    base = mini.model
    batches = {int(b): mini.tokenize(list(EVALUATION_SENTENCES)[: int(b)]) for b in args.batches.split(",")}
    made: dict[str, torch.nn.Module] = {}
    quality: dict[str, float] = {}
    failed: dict[str, str] = {}
    with torch.no_grad():
        ref = pooled_embeddings(base, batches[max(batches)])
        extra = {v.split("=", 1)[0]: json.loads(v.split("=", 1)[1]) for v in args.variant}
        for name, make in variants(mini, args.preset, args.compute, extra).items():
            if args.only and name not in args.only.split(","):
                continue
            t = time.perf_counter()
            try:
                m = make()
                for b in batches.values():  # compile for every batch shape now, outside the timed rounds
                    emb = pooled_embeddings(m, b)
            except Exception as e:  # an option Inductor cannot apply here: reported, not fatal
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                continue
            made[name] = m
            quality[name] = embedding_quality(ref, emb)["cosine_mean"]
            print(f"prepared {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        samples: dict[tuple[str, int], list[float]] = {(n, b): [] for n in made for b in batches}
        with bench_lock():
            load = _common.load_line()
            for _ in range(args.rounds):
                for b, batch in batches.items():
                    for name, m in made.items():
                        t = clock()
                        pooled_embeddings(m, batch)
                        samples[(name, b)].append(clock() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    print(_common.header(extra=f"{args.rounds} interleaved rounds, {args.clock} clock; {load}"))
    cols = " | ".join(f"batch {b}: ms (vs fp32 eager)" for b in batches)
    print(f"| variant | {cols} | embedding cosine vs fp32 (batch {max(batches)}) |")
    print("|---|" + "---:|" * len(batches) + "---:|")
    for name in made:
        cells = [f"{med[(name, b)]:.2f} ({med[('fp32 eager', b)] / med[(name, b)]:.2f}x)"
                 if ("fp32 eager", b) in med else f"{med[(name, b)]:.2f}" for b in batches]  # fmt: skip
        print(f"| {name} | {' | '.join(cells)} | {quality[name]:.5f} |")
    for name, why in failed.items():
        print(f"| {name} | failed: {why} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
