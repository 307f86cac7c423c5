"""Fuzz ``qbackend.load`` with mutated checkpoint files: the long run (the CI part is tests/robustness).

Each file is a base checkpoint (NF4, FP4, INT4, INT8, W8A8 SmoothQuant tiny models and a tiny BERT
rebuilt from its stored config) mutated once: truncated, bits flipped in the header or the data,
safetensors header entries deleted/renamed/duplicated or with dtypes, shapes, offsets altered, the
manifest JSON edited (keys deleted/renamed, values changed; mostly with a recomputed checksum, so the
edit reaches the checks behind it) or its text mangled. Every file is loaded and run in a worker
subprocess: it must end as a `CheckpointError` or as the intact file's exact output (a resealed edit
may also be another valid model); never a signal, a hang or another exception.

Run: ``nice -n 19 python benchmarks/fuzz_checkpoints.py --files 10000 --jobs 2`` (not timing
sensitive). Prints markdown tables; failing files are kept under --keep.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from qbackend.testing.fuzz_checkpoints import FuzzStats, make_bases, run_fuzz


def _job(args: tuple[Path, int, int, float]) -> FuzzStats:
    bases_dir, n, seed, timeout = args
    bases = make_bases(bases_dir / f"bases-{seed}")
    return run_fuzz(bases, n, seed, bases_dir, timeout=timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one file may take")
    parser.add_argument("--keep", type=Path, default=None, help="folder for failing files (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="qbackend-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    share = [args.files // args.jobs + (1 if j < args.files % args.jobs else 0) for j in range(args.jobs)]
    t0 = time.monotonic()
    with ProcessPoolExecutor(args.jobs) as pool:
        parts = list(pool.map(_job, [(workdir, n, args.seed * 1000 + j, args.timeout) for j, n in enumerate(share)]))
    counts, kinds, failures = Counter(), Counter(), []
    for p in parts:
        counts.update(p.counts)
        kinds.update(p.by_kind)
        failures += p.failures
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}: {sum(share)} fuzzed checkpoint files, {args.jobs} jobs, seed "
          f"{args.seed}, {time.monotonic() - t0:.0f} s\n")  # fmt: skip
    print("| outcome | files |\n|---|---|")
    for k in ("error", "ok-equal", "resealed-valid", "wrong-result", "other-error", "crash", "hang"):
        print(f"| {k} | {counts.get(k, 0)} |")
    print("\n| mutation | outcomes |\n|---|---|")
    for kind in sorted({k for k, _ in kinds}):
        print(f"| {kind} | " + ", ".join(f"{o} {n}" for (k, o), n in sorted(kinds.items()) if k == kind) + " |")
    for f in failures[:50]:
        print("FAIL", *f)
    print(f"\ncrashes: {counts.get('crash', 0)}, hangs: {counts.get('hang', 0)}, failures: {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
