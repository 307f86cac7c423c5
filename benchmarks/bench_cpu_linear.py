"""CPU speed of qbackend's quantized linear ops on a 4096x4096 layer, as a ratio to fp32 ``F.linear``.

Everything runs in one process with torch's default thread count; the methods are timed in
interleaved rounds (so a burst of load from other processes hits all of them alike) and each
figure is the median over all timed calls (the minimum is printed too: on a shared machine it is
the better estimate of uncontended speed). Also measured where they import: bf16 ``F.linear``,
bitsandbytes (``gemv_4bit`` on the canonical layout at M=1 and ``dequantize_4bit`` + ``F.linear``
otherwise; and ``Linear4bit`` in eval mode, its real CPU inference path, which repacks the weight
and computes in bf16) and torchao int8/int4 weight-only. A last column gives each method's
arithmetic error, so a fast but wrong or low-precision path shows as such.

    python benchmarks/bench_cpu_linear.py              # M in 1, 8, 64
    python benchmarks/bench_cpu_linear.py --threads 1  # per-core figures
    python benchmarks/bench_cpu_linear.py --quick      # fewer calls, for a smoke run
    python benchmarks/bench_cpu_linear.py --size 256 --ms 1 --rounds 1 --calls 2 --no-extras  # plumbing only
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
from collections.abc import Callable

import _common
import torch
import torch.nn.functional as F

from qbackend.formats import Scheme, quantize
from qbackend.kernels import prepare_weight, quantized_linear

FORMATS = {
    "NF4+nested (b64)": Scheme("nf4", blocksize=64, nested=True),
    "NF4 (b64)": Scheme("nf4", blocksize=64),
    "INT4 g64 affine": Scheme("int", bits=4, symmetric=False, blocksize=64),
    "INT4 g128 affine": Scheme("int", bits=4, symmetric=False, blocksize=128),
    "INT8 per-channel": Scheme("int", bits=8, granularity="channel"),
}


def _bnb_methods(w: torch.Tensor) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]:
    """bitsandbytes NF4 (blocks of 64, nested constants): name -> (fn, the fp32 weight it stands for)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import bitsandbytes as bnb
            import bitsandbytes.functional as bf

            qw, st = bf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
            wd = bf.dequantize_4bit(qw, st)
            # The real CPU inference path: Linear4bit in eval mode repacks the weight for its AVX-512
            # kernel on the first no-grad call (and de-nests the constants to bf16, computes in bf16).
            lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.float32,
                                    compress_statistics=True, quant_type="nf4")  # fmt: skip
            lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True,
                                           quant_type="nf4", blocksize=64)  # fmt: skip
            lin = lin.to("cpu").eval()  # .to() is what quantizes a Params4bit
            with torch.inference_mode():
                lin(torch.randn(1, w.shape[1]))
    except Exception as e:  # noqa: BLE001
        print(f"# bitsandbytes unavailable: {e!r}"[:200], file=sys.stderr)
        return {}

    def gemv_or_dequant(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # called on the canonical layout, as bitsandbytes' GPU path does
            return bf.gemv_4bit(x, qw.t(), state=st)
        return F.linear(x, bf.dequantize_4bit(qw, st))

    return {
        "bitsandbytes gemv_4bit (M=1) / dequantize_4bit+linear": (gemv_or_dequant, wd),
        "bitsandbytes Linear4bit eval (repacked, bf16 compute)": (lin, wd),
    }


def _torchao_methods(w: torch.Tensor) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]:
    out: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = {}
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001
        print(f"# torchao unavailable: {e!r}"[:200], file=sys.stderr)
        return out
    for name, cfg, dtype in [
        ("torchao int8 weight-only", lambda: Int8WeightOnlyConfig(), torch.float32),
        ("torchao int4 weight-only g128 (bf16)", lambda: Int4WeightOnlyConfig(group_size=128,
                                                                              int4_packing_format="tile_packed_to_4d"),
         torch.bfloat16),
    ]:  # fmt: skip
        try:
            m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
            with torch.no_grad():
                m.weight.copy_(w)
            with contextlib.redirect_stderr(io.StringIO()):
                quantize_(m, cfg())
                m(torch.randn(1, w.shape[1], dtype=dtype))
            out[name] = (lambda x, m=m, dtype=dtype: m(x.to(dtype)).float(), w)
        except Exception as e:  # noqa: BLE001
            print(f"# {name}: not runnable on this CPU ({type(e).__name__}: {e})"[:200], file=sys.stderr)
    return out


def _too_slow(name: str, samples: dict[str, list[float]]) -> bool:
    # e.g. torchao's int8 CPU path: after the first round, a few calls are enough
    return statistics.median(samples[name]) > 20 * statistics.median(samples["fp32 F.linear"])


def bench(ms: list[int], rounds: int, calls: int, extras: bool, size: int = 4096) -> list[dict]:
    torch.manual_seed(0)
    n = k = size
    w = torch.randn(n, k) * 0.02
    w16 = w.bfloat16()
    # name -> (fn, the fp32 weight it computes with: its error is measured against fp64 math on that)
    methods: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = {
        "fp32 F.linear": (lambda x: F.linear(x, w), w),
        "bf16 F.linear": (lambda x: F.linear(x.bfloat16(), w16), w),
    }
    for name, scheme in FORMATS.items():
        qw = quantize(w, scheme)
        kw = prepare_weight(qw)
        methods[f"qbackend {name}"] = (lambda x, kw=kw: quantized_linear(x, kw), qw.dequantize(torch.float32))
    if extras:
        methods.update(_bnb_methods(w))
        methods.update(_torchao_methods(w))
    rows = []
    with torch.inference_mode():
        for m in ms:
            x = torch.randn(m, k)
            n_calls = max(3, calls // max(1, m // 8))  # fewer calls where each is long
            errors = {}
            for name, (fn, wref) in methods.items():  # warm-up (builds the C++ library on the first call)
                y = fn(x)
                fn(x)
                exact = x.double() @ wref.double().t()
                errors[name] = float((y.double() - exact).norm() / exact.norm())
            calls_of = {name: (lambda fn=fn, x=x: fn(x)) for name, (fn, _) in methods.items()}
            times = _common.interleaved(calls_of, rounds, n_calls, give_up=_too_slow)
            base = statistics.median(times["fp32 F.linear"])
            base_min = min(times["fp32 F.linear"])
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append({"M": m, "method": name, "median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                             "ratio": base / med, "ratio_min": base_min / min(ts), "calls": len(ts),
                             "rel_err": errors[name]})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", default="1,8,64", help="comma-separated batch sizes M")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=40, help="timed calls per method per round (fewer for big M)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 8 calls")
    p.add_argument("--no-extras", action="store_true", help="skip bitsandbytes and torchao")
    p.add_argument("--size", type=int, default=4096, help="the layer is SIZE x SIZE (a multiple of 128)")
    _common.add_threads_option(p)
    a = p.parse_args()
    _common.apply_threads(a)
    if a.quick:
        a.rounds, a.calls = 2, 8
    ms = [int(v) for v in a.ms.split(",")]
    cap = torch.backends.cpu.get_cpu_capability()
    print(_common.header(extra=f"CPU capability {cap}; layer {a.size}x{a.size}"))
    rows = bench(ms, a.rounds, a.calls, not a.no_extras, a.size)
    print("\n| M | method | median ms | min ms | ratio to fp32 (medians) | ratio to fp32 (mins) | rel. error |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['M']} | {r['method']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['ratio']:.2f}x "
              f"| {r['ratio_min']:.2f}x | {r['rel_err']:.1e} |")  # fmt: skip
    print(
        "\nrel. error: ||y - y_exact|| / ||y_exact||, y_exact in float64 from the weight the method computes "
        "with (its own dequantized weight for quantized methods), so it measures arithmetic, not quantization."
    )


if __name__ == "__main__":
    main()
