"""Per-call time of ``qbackend::decode_attention`` (the fused CPU kernel) vs ``F.scaled_dot_product_attention``
at TinyLlama's decode shapes: 32 query heads, 4 KV heads, head dim 64, fp32, one query position (and a
few), K/V read from a static cache ``[B, 4, max_len, 64]`` with a bool mask, as transformers' compiled
decode step calls it (sdpa with ``enable_gqa``, after :mod:`qbackend.passes.grouped_kv`).

    python benchmarks/bench_decode_attention.py                 # KV lengths 128..2048, batch 1 and 8
    python benchmarks/bench_decode_attention.py --lengths 640 --batches 1 --threads 2

Reports the median per-call microseconds of each (the kernel called as compiled code calls it, and
through ``torch.ops``), and the max abs difference to sdpa.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from qbackend.kernels import attention as attn


def _time(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="128,640,2048", help="static KV cache lengths")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--qlen", default="1", help="query positions per call (comma list)")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    hq, hk, d = 32, 4, 64
    print(f"threads {torch.get_num_threads()}; Hq {hq}, Hkv {hk}, head dim {d}, fp32, bool mask (3/4 of cache filled)")
    print(f"{'B':>3} {'L':>2} {'S':>5} | {'sdpa us':>9} {'fused us':>9} {'op us':>8} {'speed-up':>8} | max|diff|")
    gen = torch.Generator().manual_seed(0)
    for b in map(int, a.batches.split(",")):
        for n in map(int, a.qlen.split(",")):
            for s in map(int, a.lengths.split(",")):
                q = torch.randn(b, n, hq, d, generator=gen).transpose(1, 2)  # as the q projection's view
                k = torch.randn(b, hk, s, d, generator=gen)
                v = torch.randn(b, hk, s, d, generator=gen)
                mask = torch.zeros(b, 1, n, s, dtype=torch.bool)
                mask[..., : 3 * s // 4] = True

                args = (q, k, v, mask)
                sdpa = functools.partial(F.scaled_dot_product_attention, *args, enable_gqa=True)
                fused = functools.partial(attn.decode_attention_cpu, *args)
                op = functools.partial(torch.ops.qbackend.decode_attention, *args)
                diff = (fused() - sdpa()).abs().max().item()
                t_ref, t_fused, t_op = _time(sdpa, a.reps), _time(fused, a.reps), _time(op, a.reps)
                row = f"{t_ref:9.1f} {t_fused:9.1f} {t_op:8.1f} {t_ref / t_fused:7.2f}x"
                print(f"{b:>3} {n:>2} {s:>5} | {row} | {diff:.1e}")


if __name__ == "__main__":
    main()
