"""CPU quantized linear layers, qbackend and its peers, as a ratio to fp32 ``F.linear``: one process, one table.

Shapes: 4096x4096 at M in 1, 8, 64, 480 and MiniLM's two FFN layers (384->1536, 1536->384) at M=16.
Methods, all from the same fp32 weight (peers skipped with the reason where their library is
missing; ``bash benchmarks/setup_peers.sh`` installs them):

* anchors: fp32 ``F.linear`` (ratio 1), bf16 ``F.linear`` (oneDNN);
* qbackend nf4 (b64, nested), int4 (g128 affine), int8 (per channel), as the modules
  ``qbackend.quantize_`` makes, once per ``compute`` mode this qbackend offers (a QuantConfig
  field; before it exists, the one exact fp32 path), and w8a8 (``W8A8Linear``, per-token int8
  activations);
* bitsandbytes ``Linear4bit`` NF4 eval, ONNX Runtime ``MatMulNBits`` (4-bit, block 32/128,
  accuracy_level 0/4) and ``quantize_dynamic`` int8, ggml Q4_0 / Q4_K / Q8_0 (see ``_peers.py``).

Hot weights (default): every method's weight stays in cache between calls; methods are timed in
interleaved rounds, each figure the median over all timed calls. The ``err`` column is each
method's output error against its OWN dequantized weight (``||y - x W_own^T|| / ||x W_own^T||``, the
reference in float64): it measures the arithmetic (bf16 or int8 activations), not the quantization.

Cold weights (``--cold``): each method cycles through enough distinct copies of its layer to hold
``--cold-mb`` (default 256 MB, far above the 32 MB L3) of weights, so each call streams its weight
from memory; reported as achieved bandwidth (weight bytes / time per layer) next to the machine's
streaming read bandwidth (``sum`` over a 1 GiB tensor) measured in the same interleaved rounds.

    python benchmarks/bench_cpu_linear.py                       # the hot table, all shapes
    python benchmarks/bench_cpu_linear.py --cold                # + the cold-weights table (4096x4096, M=1)
    python benchmarks/bench_cpu_linear.py --only 'qbackend|ORT' # methods whose name matches a regex
    python benchmarks/bench_cpu_linear.py --quick               # 2 rounds of 8 calls
    python benchmarks/bench_cpu_linear.py --small --no-peers    # smoke run: 256x256, qbackend only, few calls
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import _common
import _peers
import torch
import torch.nn.functional as F
from torch import nn

import qbackend
from qbackend import QuantConfig, W8A8Linear
from qbackend.formats import Scheme, quantize
from qbackend.kernels import prepare_weight

Linear = _peers.Linear
ANCHOR = "fp32 F.linear"
# name -> (N, K, default Ms): N outputs, K inputs
SHAPES: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "4096x4096": (4096, 4096, (1, 8, 64, 480)),
    "MiniLM 384->1536": (1536, 384, (16,)),
    "MiniLM 1536->384": (384, 1536, (16,)),
}
QB_PRESETS = {"nf4": "nf4 b64 nested", "int4": "int4 g128", "int8": "int8"}
COMPUTE_MODES = ("auto", "fp32", "bf16", "int8")


def compute_modes() -> tuple[str | None, ...]:
    """The ``compute`` values to measure: all of them once QuantConfig has the field, else None (today's path)."""
    return COMPUTE_MODES if "compute" in {f.name for f in dataclasses.fields(QuantConfig)} else (None,)


# ---- methods ---------------------------------------------------------------------------------------------


def _module_linear(mod: nn.Module, wd: torch.Tensor) -> Linear:
    nbytes = sum(t.numel() * t.element_size() for t in mod.buffers())

    def clone() -> Callable[[torch.Tensor], torch.Tensor]:
        import copy

        return copy.deepcopy(mod)

    return Linear(mod, wd, nbytes, clone)


def qbackend_linear(w: torch.Tensor, preset: str, compute: str | None) -> Linear:
    """The module ``qbackend.quantize_`` puts in place of an ``nn.Linear`` holding ``w``."""
    n, k = w.shape
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    holder = nn.Sequential(lin)
    cfg: dict[str, object] = {"preset": preset, "min_params": 0}
    if compute is not None:
        cfg["compute"] = compute
    try:
        qbackend.quantize_(holder, cfg)
    except Exception as e:  # noqa: BLE001 - e.g. a compute mode this CPU lacks: its message is the reason
        raise _peers.Unavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from e
    mod = holder[0]
    return _module_linear(mod, quantize(w, mod.scheme).dequantize(torch.float32))


def qbackend_w8a8(w: torch.Tensor) -> Linear:
    """``W8A8Linear`` on per-channel int8 codes of ``w``, per-token dynamic int8 activations, no smoothing."""
    n, k = w.shape
    qw = quantize(w, Scheme("int", bits=8, granularity="channel"))
    codes, scale = prepare_weight(qw).tensors[:2]
    mod = W8A8Linear(codes, scale, None, out_features=n, in_features=k)
    return _module_linear(mod, qw.dequantize(torch.float32))


def _float_linear(w: torch.Tensor, dtype: torch.dtype) -> Linear:
    wd = w.to(dtype)

    def make() -> Callable[[torch.Tensor], torch.Tensor]:
        wc = wd.clone()
        if dtype == torch.float32:
            return lambda x: F.linear(x, wc)
        return lambda x: F.linear(x.to(dtype), wc).float()

    return Linear(make(), wd.float(), wd.numel() * wd.element_size(), make)


def method_builders(threads: int, peers: bool, tmp: Path) -> dict[str, Callable[[torch.Tensor], Linear]]:
    """name -> builder(w); the anchor first."""
    out: dict[str, Callable[[torch.Tensor], Linear]] = {
        ANCHOR: lambda w: _float_linear(w, torch.float32),
        "bf16 F.linear": lambda w: _float_linear(w, torch.bfloat16),
    }
    for mode in compute_modes():
        sfx = f" compute={mode}" if mode else ""
        for preset, label in QB_PRESETS.items():
            out[f"qbackend {label}{sfx}"] = lambda w, p=preset, c=mode: qbackend_linear(w, p, c)
    out["qbackend w8a8 (int8 act per token)"] = qbackend_w8a8
    if not peers:
        return out
    out["bnb Linear4bit nf4 (eval)"] = _peers.bnb_linear4bit
    for block in (32, 128):
        for acc in (0, 4):
            out[f"ORT MatMulNBits b{block} acc{acc}"] = lambda w, b=block, a=acc: _peers.ort_matmul_nbits(
                w, b, a, threads
            )
    out["ORT dynamic int8"] = lambda w: _peers.ort_dynamic_int8(w, threads, tmp)
    for q, repack in (("Q4_0", True), ("Q4_K", True), ("Q4_K", False), ("Q8_0", False)):
        out[f"ggml {q}{' repack' if repack else ''}"] = lambda w, q=q, r=repack: _peers.ggml_linear(w, q, r, threads)
    return out


def build(builders: dict[str, Callable[[torch.Tensor], Linear]], w: torch.Tensor, shape: str) -> dict[str, Linear]:
    built: dict[str, Linear] = {}
    for name, make in builders.items():
        try:
            built[name] = make(w)
        except _peers.Unavailable as e:
            print(f"# {shape}: skipped {name}: {e}", file=sys.stderr, flush=True)
    return built


def rel_error(y: torch.Tensor, x: torch.Tensor, w_own: torch.Tensor) -> float:
    exact = x.double() @ w_own.double().t()
    return float((y.double() - exact).norm() / exact.norm().clamp_min(1e-300))


# ---- hot weights -----------------------------------------------------------------------------------------


def bench_hot(methods: dict[str, Linear], k: int, ms: tuple[int, ...], rounds: int, calls: int) -> dict:
    """{"M": {method: {"ms", "min_ms", "ratio", "err"}}}."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for m in ms:
            x = torch.randn(m, k, generator=gen)
            errs = {}
            for name, lin in methods.items():
                lin.fn(x)  # warm-up: builds kernels, repacks, plans
                errs[name] = rel_error(lin.fn(x), x, lin.weight)
            n_calls = max(3, calls // max(1, m // 8))  # fewer calls where each is long
            fns = {name: (lambda f=lin.fn, x=x: f(x)) for name, lin in methods.items()}
            # settle: the peers' spinning pools (and ours) must not hold the cores during another's calls
            times = _common.interleaved(fns, rounds, n_calls, give_up=_too_slow, settle_s=SETTLE_S, rewarm=2)
            base = statistics.median(times[ANCHOR])
            out[m] = {name: {"ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                             "ratio": base / statistics.median(ts), "err": errs[name]}
                      for name, ts in times.items()}  # fmt: skip
    return out


#: pause before each method's calls in a round (s): longer than the spin-wait of ONNX Runtime's and
#: OpenMP's thread pools, which otherwise run on after their method's calls (seen: 2.5x slower calls
#: of the next method at M = 480 on a 2-core machine)
SETTLE_S = 0.03


def _too_slow(name: str, samples: dict[str, list[float]]) -> bool:
    return statistics.median(samples[name]) > 20 * statistics.median(samples[ANCHOR])


def hot_table(shape: str, res: dict) -> str:
    ms = list(res)
    names = list(res[ms[0]])
    lines = [f"**{shape}, hot weights**: ratio to fp32 F.linear (median ms in brackets); err vs own weights",
             "", "| method | " + " | ".join(f"M={m}" for m in ms) + " | err |",
             "|---|" + "---:|" * (len(ms) + 1)]  # fmt: skip
    for name in names:
        cells = [f"{res[m][name]['ratio']:.2f}x ({res[m][name]['ms']:.3f})" if name in res[m] else "-" for m in ms]
        err = max(res[m][name]["err"] for m in ms if name in res[m])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {err:.1e} |")
    return "\n".join(lines)


# ---- cold weights ----------------------------------------------------------------------------------------


def stream_read() -> tuple[Callable[[], object], int]:
    """A 1 GiB fp32 ``sum``: the machine's streaming read bandwidth as torch sees it."""
    big = torch.ones(2**28)
    return (lambda: big.sum()), big.numel() * 4


def bench_cold(methods: dict[str, Linear], k: int, m: int, cold_mb: float, rounds: int) -> dict:
    """{method: {"layers", "ms_per_layer", "gbps", "of_stream"}} plus "stream read"."""
    x = torch.randn(m, k)
    fns: dict[str, Callable[[], object]] = {}
    per_call_bytes: dict[str, int] = {}
    layers: dict[str, int] = {}
    for name, lin in methods.items():
        if lin.clone is None:
            continue
        n_layers = max(2, math.ceil(cold_mb * 2**20 / lin.nbytes))
        copies = [lin.clone() for _ in range(n_layers)]
        for c in copies:
            c(x)  # warm-up (plans, repacks, per-M graphs)
        fns[name] = lambda copies=copies: [c(x) for c in copies]
        per_call_bytes[name], layers[name] = n_layers * lin.nbytes, n_layers
    read, read_bytes = stream_read()
    fns["stream read (1 GiB sum)"] = read
    per_call_bytes["stream read (1 GiB sum)"], layers["stream read (1 GiB sum)"] = read_bytes, 1
    with torch.inference_mode():
        times = _common.medians(_common.interleaved(fns, rounds, 2, warmup=1))
    stream = per_call_bytes["stream read (1 GiB sum)"] / times["stream read (1 GiB sum)"]
    return {name: {"layers": layers[name], "ms_per_layer": 1e3 * t / layers[name],
                   "gbps": per_call_bytes[name] / t / 1e9, "of_stream": per_call_bytes[name] / t / stream}
            for name, t in times.items()}  # fmt: skip


def cold_table(shape: str, m: int, res: dict, nbytes: dict[str, int]) -> str:
    base = res[ANCHOR]["ms_per_layer"]
    lines = [f"**{shape}, cold weights, M={m}** (each method cycles through distinct copies of its layer)", "",
             "| method | weight MB/layer | layers | ms/layer | ratio to fp32 | GB/s | of stream read |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in res.items():
        mb = nbytes.get(name)
        lines.append(f"| {name} | {_common.fmt(None if mb is None else mb / 2**20, '.1f')} | {r['layers']} | "
                     f"{r['ms_per_layer']:.3f} | {base / r['ms_per_layer']:.2f}x | {r['gbps']:.1f} | "
                     f"{100 * r['of_stream']:.0f}% |")  # fmt: skip
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--ms", default="", help="override every shape's M list (comma list)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=40, help="timed calls per method per round (fewer for big M)")
    p.add_argument("--only", default="", help="regex: methods whose name matches (the fp32 anchor always runs)")
    p.add_argument("--no-peers", action="store_true", help="qbackend and torch only")
    p.add_argument("--cold", action="store_true", help="also the cold-weights table (first shape)")
    p.add_argument("--cold-only", action="store_true", help="only the cold-weights table")
    p.add_argument("--cold-mb", type=float, default=256.0, help="weights per method in the cold mode (MB)")
    p.add_argument("--cold-ms", default="1", help="M of the cold table")
    p.add_argument("--quick", action="store_true", help="2 rounds of 8 calls (qbackend bench --quick)")
    p.add_argument("--small", action="store_true", help="smoke run: a 256x256 layer, M=1,8, few calls")
    p.add_argument("--json", default="", help="write all figures as JSON here")
    _common.add_threads_option(p)
    a = p.parse_args(argv)
    _common.apply_threads(a)
    shapes = dict(SHAPES)
    if a.quick:
        a.rounds, a.calls = 2, 8
    if a.small:
        shapes = {"256x256": (256, 256, (1, 8))}
        a.shapes, a.rounds, a.calls, a.cold_mb = "256x256", 2, 3, 2.0
    threads = torch.get_num_threads()
    builders = method_builders(threads, not a.no_peers, Path(tempfile.mkdtemp(prefix="qb-bench-")))
    if a.only:
        builders = {n: b for n, b in builders.items() if n == ANCHOR or re.search(a.only, n)}
    modes = compute_modes()
    ggml = None if a.no_peers else _peers.ggml_version()
    print(_common.header(extra=f"CPU capability {torch.backends.cpu.get_cpu_capability()}; {threads} threads; "
                               f"qbackend compute modes: {', '.join(m or 'fp32 (no compute option)' for m in modes)}"
                               + (f"; llama-cpp-python {ggml}" if ggml else "")), flush=True)  # fmt: skip
    report: dict[str, object] = {"machine": _common.machine_info(), "compute_modes": list(modes), "hot": {}, "cold": {}}
    for i, shape in enumerate(s.strip() for s in a.shapes.split(",") if s.strip()):
        if shape not in shapes:
            p.error(f"unknown shape {shape!r}; valid: {', '.join(shapes)}")
        n, k, ms = shapes[shape]
        if a.ms:
            ms = tuple(int(v) for v in a.ms.split(","))
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.02
        methods = build(builders, w, shape)
        if not a.cold_only:
            res = bench_hot(methods, k, ms, a.rounds, a.calls)
            report["hot"][shape] = res  # type: ignore[index]
            print("\n" + hot_table(shape, res), flush=True)
        if (a.cold or a.cold_only) and i == 0:
            for m in (int(v) for v in a.cold_ms.split(",")):
                cres = bench_cold(methods, k, m, a.cold_mb, a.rounds)
                report["cold"][f"{shape} M={m}"] = cres  # type: ignore[index]
                print("\n" + cold_table(shape, m, cres, {nm: lin.nbytes for nm, lin in methods.items()}), flush=True)
        del methods
    print(f"\n# {_common.load_line('load average at the end')}")
    if a.json:
        _common.write_json(a.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
