"""Cost of the per-call weight check (``weight_check``) on a batch-1 all-MiniLM-L6-v2 call.

The compiled model checks, before every call, that each quantized weight is still what was quantized
(see ``qbackend.passes.weight_stamp``). Measured two ways, in one process, interleaved rounds,
medians:

* the check alone: every quantized weight's stamp tested as the guard tests it ("version",
  "sampled", "full"), per call;
* whole calls of the compiled model (NF4) with each ``weight_check``, batch 1 (one sentence).

Run: ``flock /tmp/qb-bench.lock python benchmarks/bench_weight_check.py`` (``--quick``: fewer rounds).
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common
import torch

from qbackend.passes import weight_cache


def _entries(model: torch.nn.Module) -> list[tuple[torch.Tensor, object]]:
    """(parameter, its live QuantEntry) for every quantized weight of a compiled model."""
    out = []
    for p in model.parameters():
        per = weight_cache._entries.get(p)
        for ref in (per or {}).values():
            entry = ref()
            if entry is not None:
                out.append((p, entry))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    _common.add_threads_option(parser)
    args = parser.parse_args()
    _common.apply_threads(args)
    print(_common.header())
    from qbackend.demo.minilm import load_minilm

    mini = load_minilm()
    model = mini.model.eval()
    batch = mini.tokenize(["A short sentence about the weather in spring."])
    compiled = {mode: torch.compile(model, backend="qbackend", options={"weight_check": mode})
                for mode in ("version", "sampled", "full")}  # fmt: skip
    with torch.no_grad():
        for c in compiled.values():
            c(**batch)
    entries = _entries(model)

    def check(mode: str):
        def run() -> None:
            for p, e in entries:
                e.is_stale(p, mode)

        return run

    rounds = 5 if args.quick else 15
    alone = _common.interleaved({m: check(m) for m in ("version", "sampled", "full")}, rounds, 20, warmup=5)

    def call(mode: str):
        def run() -> None:
            with torch.no_grad():
                compiled[mode](**batch)

        return run

    calls = _common.interleaved({m: call(m) for m in ("version", "sampled", "full")}, rounds, 10, warmup=3,
                                alternate=True)  # fmt: skip
    a, c = _common.medians(alone), _common.medians(calls)
    base = c["version"]
    print(f"\nall-MiniLM-L6-v2 NF4, batch 1 ({batch['input_ids'].shape[1]} tokens), {len(entries)} quantized weights; "
          f"{rounds} interleaved rounds, medians\n")  # fmt: skip
    print("| weight_check | check alone per call | % of a batch-1 call | batch-1 call |")
    print("|---|---|---|---|")
    for m in ("version", "sampled", "full"):
        print(f"| {m} | {a[m] * 1e6:.1f} us | {100 * a[m] / base:.2f}% | {c[m] * 1e3:.2f} ms |")
    spread = statistics.quantiles(calls["version"], n=4)
    print(f"\nbatch-1 call quartiles (version): {spread[0] * 1e3:.2f} / {spread[2] * 1e3:.2f} ms; "
          f"{_common.load_line('load average at the end')}; {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
