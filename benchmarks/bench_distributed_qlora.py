"""QLoRA on 1 and 2 ranks (FSDP2, gloo on CPU): per-rank memory and step time.

Runs ``examples/qlora_fsdp_llama.py`` under ``torch.distributed.run`` once per rank count, each in
fresh processes, and prints one markdown table: per rank, the quantized base it holds (exact
bytes), its RSS after imports, the RSS added by the sharded model (memory freed by the build handed
back to the OS first), the RSS added at the training peak (sampled every millisecond) and the
median step time (warm-up steps excluded). Every rank runs ``--threads`` torch threads (default 1,
so 2 ranks use 2 cores where 1 rank uses 1: the step times compare N ranks on N cores).

    python benchmarks/bench_distributed_qlora.py [--ranks 1 2] [--hidden 1536 --layers 4 --batch 4 --seq 32]
        [--steps 6] [--threads 1] [--mode fsdp|ddp] [--mmap-threshold 0 1048576] [--json OUT]

The heap columns are glibc's own figures (``mallinfo2``, sampled with RSS): the live heap a training
step adds at most, and the freed memory malloc still holds at the RSS peak. By default glibc serves
blocks it has seen freed from its heap and keeps them after the next free, so the RSS peak counts
freed buffers too; ``--mmap-threshold 1048576`` (glibc's M_MMAP_THRESHOLD, fixed) returns blocks of
1 MiB and more to the OS at each free, and the peak then follows live memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qlora_fsdp_llama.py"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--mmap-threshold", type=int, nargs="+", default=[0], metavar="BYTES",
                   help="glibc M_MMAP_THRESHOLD per run, 0 = glibc's default (dynamic); e.g. 0 1048576: both")
    return p.parse_args()


def run(n: int, args: argparse.Namespace, out: Path, mmap_threshold: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(EXAMPLE),
           "--mode", args.mode, "--hidden", str(args.hidden), "--layers", str(args.layers), "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--json", str(out), "--heap"]  # fmt: skip
    if mmap_threshold:
        cmd += ["--mmap-threshold", str(mmap_threshold)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{n} rank(s) failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _row(malloc: str, n: int, r: dict) -> str:
    mib = 2**20
    live = (r["heap_in_use_max"] - r["heap_before_train"]["in_use"]) / mib if r.get("heap_in_use_max") else float("nan")
    kept = r["heap_at_peak"]["free_kept"] / mib if r.get("heap_at_peak") else float("nan")
    return (f"| {malloc} | {n} | {r['rank']} | {r['quantized_base_bytes_held'] / mib:.1f} | "
            f"{r['quantized_base_bytes_whole'] / mib:.1f} | {r['rss_start_mb']:.0f} | "
            f"{r['rss_before_train_mb'] - r['rss_start_mb']:.0f} | {r['rss_peak_train_mb'] - r['rss_start_mb']:.0f} | "
            f"{live:.0f} | {kept:.0f} | {r['step_s_median']:.2f} |")  # fmt: skip


def main() -> None:
    args = parse_args()
    print(_common.header(extra=f"{args.mode}, gloo, {args.threads} torch thread(s) per rank"))
    print(f"# model: Llama-architecture, hidden {args.hidden}, {args.layers} blocks, NF4 (b64, nested) base + LoRA r=8 "
          f"on all projections; global batch {args.batch}x{args.seq}; {args.steps} steps, first {args.warmup} untimed")
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, threshold in enumerate(args.mmap_threshold):  # a threshold given twice: two interleaved rounds
            malloc = f"mmap from {threshold >> 10} KiB" if threshold else "glibc default"
            for n in args.ranks:
                res = results[f"{i}: {n} rank(s), threshold {threshold}"] = run(n, args, Path(tmp) / f"{i}-{n}.json",
                                                                               threshold)  # fmt: skip
                rows += [_row(malloc, n, r) for r in res["ranks"]]
    print("\n| malloc | ranks | rank | quantized base held (MiB) | whole base (MiB) | RSS after imports (MiB) "
          "| sharded model: RSS - after imports (MiB) | training peak: RSS - after imports (MiB) "
          "| live heap added in training, max (MiB) | freed memory kept by malloc at the RSS peak (MiB) "
          "| median step (s) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\n# {_common.load_line('load average at the end')}")
    if args.json:
        _common.write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
