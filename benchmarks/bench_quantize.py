"""Quantization speed on CPU: qbackend.formats.quantize vs bitsandbytes.functional.quantize_4bit.

    python benchmarks/bench_quantize.py              # the issue's case plus a few more, 9 runs each
    python benchmarks/bench_quantize.py --quick      # 4096x4096 NF4 nested only

Runs in one process. Each repeat times ours and bitsandbytes back to back (alternating which goes
first) so that both see the same machine load; the table reports medians and the ratio ours/bnb
(< 1: ours is faster). It also checks that both produce the same bytes.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import _common
import torch

CASES = [
    # (label, shape, dtype, quant_type, blocksize, nested)
    ("NF4 b64 nested, fp32 4096x4096", (4096, 4096), torch.float32, "nf4", 64, True),
    ("NF4 b64 plain, fp32 4096x4096", (4096, 4096), torch.float32, "nf4", 64, False),
    ("FP4 b64 nested, fp32 4096x4096", (4096, 4096), torch.float32, "fp4", 64, True),
    ("NF4 b64 nested, bf16 4096x4096", (4096, 4096), torch.bfloat16, "nf4", 64, True),
    ("NF4 b128 nested, fp16 11008x4096", (11008, 4096), torch.float16, "nf4", 128, True),
    ("NF4 b64 nested, fp32 1024x1024", (1024, 1024), torch.float32, "nf4", 64, True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    _common.add_threads_option(ap)
    ap.add_argument("--quick", action="store_true", help="only the 4096x4096 NF4 nested case")
    args = ap.parse_args()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as F

    from qbackend.formats import Scheme, quantize

    _common.apply_threads(args)
    cases = CASES[:1] if args.quick else CASES
    print(_common.header())
    print(f"median of {args.repeats} runs (ours and bitsandbytes alternating)\n")
    header = f"| {'case':34s} | ours (s) | bnb (s) | ours/bnb | same bytes |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    g = torch.Generator().manual_seed(0)
    for label, shape, dtype, qt, bs, nested in cases:
        w = torch.randn(shape, generator=g).to(dtype)
        scheme = Scheme(qt, blocksize=bs, nested=nested)

        def ours(w=w, scheme=scheme):
            return quantize(w, scheme)

        def theirs(w=w, bs=bs, nested=nested, qt=qt):
            return F.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type=qt)

        qw, (packed, state) = ours(), theirs()  # warm-up (and the equality check)
        same = torch.equal(qw.codes, packed.view(-1))
        if nested:
            same = same and torch.equal(qw.nested.codes, state.absmax) and torch.equal(qw.nested.offset, state.offset)
        else:
            same = same and torch.equal(qw.scale, state.absmax)
        times = _common.interleaved({"ours": ours, "bnb": theirs}, args.repeats, 1, alternate=True)
        mo, mb = statistics.median(times["ours"]), statistics.median(times["bnb"])
        print(f"| {label:34s} | {mo:8.3f} | {mb:7.3f} | {mo / mb:8.2f} | {'yes' if same else 'NO':10s} |")
    print(f"\n{_common.load_line('load average at the end')}")


if __name__ == "__main__":
    main()
