"""Decode A/B in one process: the same quantized Llama compiled twice, one setting off (A) and on (B), or
llama.cpp (A) against qbackend (B).

On this shared 2-core machine separate processes differ by +-10% from run to run, which hides a
change of a few percent; in one process, with the two compiled models' decode rounds interleaved, it
shows. The model and runner are ``bench_llm.py``'s (random seeded weights, static cache, batch 1).
Each variant is compiled through its own code object: both models have the same structure and
Dynamo's guards do not tell the instances apart, so it would otherwise reuse the first compile.

Settings (``--ab``):

* ``groups``: qbackend's grouping of the linears that read one input at decode (q/k/v, gate/up; the
  pass ``qbackend.passes.group_linears``), off -> on;
* ``size-asserts``: Inductor's ``size_asserts``, on -> off;
* ``llama.cpp``: llama.cpp (A) against qbackend (B) on the same weights, in the llama.cpp type of the
  preset (``--gguf-type``: Q4_0 for nf4 and int4, Q8_0 for int8). This VM's memory moves between a fast
  and a slow state for minutes at a time, by 20-30%, so separate processes of the two (``bench_llm.py``)
  may each catch another state; here both see every state. Needs llama-cpp-python and gguf
  (``benchmarks/setup_peers.sh``).

    python benchmarks/bench_decode_ab.py --dims qwen0.5b --ab groups --rounds 9
    python benchmarks/bench_decode_ab.py --dims qwen0.5b --ab size-asserts --skip-module-guards
    python benchmarks/bench_decode_ab.py --dims tinyllama --preset int8 --ab llama.cpp --prompt 128 --steps 64
    python benchmarks/bench_decode_ab.py --small --ab groups --rounds 2 --steps 4 --json out.json  # smoke

Prints the median ms per decode token of each variant, every round's figure, and B/A both as the ratio of
the medians and as the median of each round's B over its A; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common
import bench_llm
import torch

AB = ("groups", "size-asserts", "llama.cpp")
#: the llama.cpp type each preset is compared with by default (the same bits per weight, block scales)
GGUF_TYPE = {"nf4": "Q4_0", "int4": "Q4_0", "int8": "Q8_0"}


def llama_cpp_runner(a: argparse.Namespace, cfg: Any) -> bench_llm.LlamaCppRunner:
    """llama.cpp on this model's weights (``bench_llm``'s cached GGUF in ``a.gguf_type``), warmed up."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"--ab llama.cpp needs llama-cpp-python and gguf ({e.name} is missing): "
                         "bash benchmarks/setup_peers.sh <venv>") from None  # fmt: skip
    threads = torch.get_num_threads()
    path = bench_llm.gguf_file(cfg, a.seed, a.gguf_type, threads)
    r = bench_llm.LlamaCppRunner(path, 1, a.prompt + a.steps + 8, threads, a.prompt)
    bench_llm.run_once(r, _prompt(a, cfg), 4)
    return r


def _compiled(model: torch.nn.Module, name: str, options: dict[str, Any], skip_module_guards: bool) -> Any:
    """``torch.compile`` of a forwarding function with its own code object (see the module docstring)."""
    ns: dict[str, Any] = {}
    exec(compile("def forward(**kw):\n    return model(**kw)\n", f"<decode-ab {name}>", "exec"), {"model": model}, ns)
    opts = dict(options)
    if skip_module_guards:
        opts["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return torch.compile(ns["forward"], backend="qbackend", dynamic=False, options=opts)


def runner(a: argparse.Namespace, cfg: Any, name: str, setting_on: bool) -> bench_llm.TorchRunner:
    """The quantized model of variant ``name`` (``setting_on``: B), compiled and warmed up."""
    model = bench_llm.build_model(cfg, a.seed)
    bench_llm._quantize(model, a.preset, a.compute)
    bench_llm._register_backend()
    options: dict[str, Any] = dict(bench_llm._options(a.preset, a.compute))
    if (a.ab == "size-asserts" and setting_on) or a.no_size_asserts:
        options["inductor"] = {"size_asserts": False}
    r = bench_llm.TorchRunner(model, cfg, True, torch.float32, a.prompt + a.steps + 8)
    r.fn = _compiled(model, name, options, a.skip_module_guards)
    with _grouping(a, setting_on):
        bench_llm.run_once(r, _prompt(a, cfg), 4)  # compiles the prefill and the decode step
    return r


@contextlib.contextmanager
def _grouping(a: argparse.Namespace, setting_on: bool) -> Iterator[None]:
    """The grouping pass switched for this variant (it runs while compiling, also on a recompile)."""
    from qbackend.passes import group_linears

    old = group_linears.ENABLED
    group_linears.ENABLED = setting_on if a.ab == "groups" else old
    try:
        yield
    finally:
        group_linears.ENABLED = old


def _group_regions() -> int | None:
    """The library's count of group calls run as one region, int8 and int16 compute together (None: no
    such kernels here)."""
    from qbackend.kernels.cpu import int8_compute, int16_compute

    lib8, lib16 = int8_compute._lib(), int16_compute._lib()
    if lib8 is None and (lib16 is None or not int16_compute.packs()):
        return None
    return (0 if lib8 is None else int(lib8.qbi8_group_regions())) + (
        int(lib16[0].qbi16_group_regions()) if lib16 is not None else 0)


def _prompt(a: argparse.Namespace, cfg: Any) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(a.seed + 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ab", required=True, choices=AB, help="the setting switched between A and B")
    p.add_argument("--dims", default="qwen0.5b", choices=sorted(bench_llm.DIMS))
    p.add_argument("--small", action="store_true", help="smoke run: bench_llm's 2-layer model, hidden 256")
    p.add_argument("--preset", default="nf4", choices=("nf4", "int4", "int8"))
    p.add_argument("--compute", default="auto", choices=("auto", "fp32", "bf16", "int8"))
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens before each round's decode")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    p.add_argument("--rounds", type=int, default=7, help="rounds, A and B interleaved")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-module-guards", action="store_true",
                   help="both variants: torch.compiler.skip_guard_on_all_nn_modules_unsafe as guard_filter_fn")
    p.add_argument("--no-size-asserts", action="store_true",
                   help="both qbackend variants: Inductor's size_asserts off (bench_llm.py's option)")
    p.add_argument("--gguf-type", default="", choices=("", *sorted(bench_llm.LLAMA_CPP_TYPES)),
                   help="--ab llama.cpp: llama.cpp's type (default: Q4_0 for nf4 and int4, Q8_0 for int8)")
    p.add_argument("--json", default="", help="write the figures as JSON here")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.steps < 1 or a.prompt < 1:
        p.error("--rounds, --steps and --prompt must be at least 1")
    if a.no_size_asserts and a.ab == "size-asserts":
        p.error("--no-size-asserts fixes what --ab size-asserts switches")
    a.gguf_type = a.gguf_type or GGUF_TYPE[a.preset]
    dims = bench_llm.SMALL if a.small else bench_llm.DIMS[a.dims]
    print(_common.header(extra=f"model {json.dumps(dims)}; {a.preset}, compute {a.compute}; A/B: {a.ab}"), flush=True)
    cfg = bench_llm.llama_config(dims, a.prompt + a.steps + 8)
    labels = {"groups": ("groups off", "groups on"), "size-asserts": ("size asserts on", "size asserts off"),
              "llama.cpp": (f"llama.cpp {a.gguf_type}", f"qbackend {a.preset}")}[a.ab]  # fmt: skip
    first = llama_cpp_runner(a, cfg) if a.ab == "llama.cpp" else runner(a, cfg, "A", False)
    variants = {labels[0]: (first, False), labels[1]: (runner(a, cfg, "B", True), True)}
    ids = _prompt(a, cfg)
    ms: dict[str, list[float]] = {k: [] for k in variants}
    regions: dict[str, int | None] = dict.fromkeys(variants, 0)
    for _ in range(a.rounds):
        for k, (r, on) in variants.items():
            before = _group_regions()
            with _grouping(a, on):
                ms[k].append(bench_llm.run_once(r, ids, a.steps).decode_s / a.steps * 1e3)
            after = _group_regions()
            regions[k] = None if before is None or after is None else regions[k] + after - before  # type: ignore[operator]
    med = {k: statistics.median(v) for k, v in ms.items()}
    for k, v in ms.items():
        print(f"{k}: median {med[k]:.3f} ms/token  (rounds: {' '.join(f'{x:.2f}' for x in v)}; "
              f"group calls: {regions[k]})")  # fmt: skip
    ratio = med[labels[1]] / med[labels[0]]
    # each round's B over its own A: this VM's memory changes state for seconds to minutes, and a round's
    # two figures see the same state more often than the medians of all rounds do
    paired = statistics.median(tb / ta for ta, tb in zip(ms[labels[0]], ms[labels[1]], strict=True))
    print(f"B/A: {ratio:.3f} (medians), {paired:.3f} (median of the rounds' B/A)  "
          f"({_common.load_line('load average at the end')})")  # fmt: skip
    if a.ab == "llama.cpp":
        print(f"decode tokens/s: {labels[1]} {1e3 / med[labels[1]]:.2f}, {labels[0]} {1e3 / med[labels[0]]:.2f} "
              f"({1 / ratio:.3f}x; rounds paired {1 / paired:.3f}x)")  # fmt: skip
    if a.json:
        res = {"ab": a.ab, "dims": dims, "ms_per_token": ms, "median": med, "b_over_a": ratio,
               "b_over_a_paired": paired, "group_calls": regions}  # fmt: skip
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
