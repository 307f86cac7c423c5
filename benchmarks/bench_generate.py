"""tokens/s of ``model.generate()`` (greedy, static KV cache) of a Llama-architecture model: float vs qbackend.

The model is ``transformers.LlamaForCausalLM`` built from a config with random weights from a fixed
seed (no download): ``demo`` is the demo's decode model (hidden 512, 8 layers, vocab 8000, ~27M
parameters, 107 MB in fp32), ``small`` the same with 2 layers, ``tiny`` is for tests. Methods, all on
the same weights and the same prompt, each calling ``generate(ids, max_new_tokens=N, do_sample=False)``
with a static cache:

* ``fp32 eager``: the float model;
* ``bf16 inductor``: a bf16 copy with ``forward`` compiled by Inductor (what ``torch.compile`` gives
  without quantization);
* ``qbackend <p> eager``: ``qbackend.quantize_(copy, p)``, uncompiled;
* ``qbackend <p> compiled``: ``qbackend.generation.compile_for_generation(copy, {"preset": p})``.

tokens/s = N / seconds of one whole ``generate`` call (prefill of the prompt included), median over
``--rounds`` rounds that interleave the methods. Set-up (quantization, compiles) happens in an untimed
first call per method, whose compiles are counted (``torch._dynamo.utils.counters``) as are those
of the timed calls (must be 0). ``same tokens`` compares each quantized method's tokens with the
eager ``quantize_`` model's of the same preset, and the float rows' with fp32 eager's (random weights
have nearly tied logits, so any difference in rounding can flip a token). On the exact path
(``--compute fp32``) a compiled row gives exactly the eager tokens; where ``compute`` resolves to
int8 activations (NF4/INT4 under "auto" on a CPU with VNNI), compiled and eager round their
activations from inputs that differ in the last float bits (Inductor fuses the norms), so their
logits differ by a fraction of the quantization error and a near tie can go the other way.

    flock /tmp/qb-bench.lock python benchmarks/bench_generate.py            # demo model, nf4, int4 and int8
    python benchmarks/bench_generate.py --lock /tmp/qb-bench.lock           # compiles first, the lock only for timing
    python benchmarks/bench_generate.py --shape tiny --new-tokens 4 --rounds 1 --presets nf4   # plumbing
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import _common

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "demo": dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                 num_hidden_layers=8, vocab_size=8000),
    "small": dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=8000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=1, vocab_size=256),
}  # fmt: skip


@dataclass
class Row:
    method: str
    tokens_per_s: float = 0.0
    vs_fp32_eager: float = 0.0
    same_tokens: bool | None = None  # vs the reference named in the module docstring
    first_diff: int | None = None  # index of the first new token that differs from the reference's
    setup_s: float = 0.0  # the first call: quantization and compiles
    compiles_setup: int = 0
    compiles_timed: int = 0
    module_mb: float = 0.0  # parameters + buffers of the module (a compiled row: the float module it was compiled from)


def build(shape: str, max_positions: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # no eos token: every call makes exactly N new tokens
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, max_position_embeddings=max_positions,
                      pad_token_id=0, eos_token_id=None)  # fmt: skip
    return LlamaForCausalLM._from_config(cfg, dtype=torch.float32).eval()


def methods(base: torch.nn.Module, presets: list[str], options: dict) -> dict[str, torch.nn.Module]:
    import qbackend
    from qbackend.generation import compile_for_generation

    out = {"fp32 eager": base}
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    bf16.forward = torch.compile(bf16.forward)
    bf16.generation_config.disable_compile = True
    out["bf16 inductor"] = bf16
    for p in presets:
        eager = copy.deepcopy(base)
        qbackend.quantize_(eager, {**options, "preset": p})
        out[f"qbackend {p} eager"] = eager
        out[f"qbackend {p} compiled"] = compile_for_generation(copy.deepcopy(base), {**options, "preset": p})
    return out


def reference_of(name: str) -> str:
    """A compiled qbackend row is compared with its preset's eager row; every other row with fp32 eager."""
    compiled_qbackend = name.startswith("qbackend") and name.endswith(" compiled")
    return name.replace(" compiled", " eager") if compiled_qbackend else "fp32 eager"


@contextlib.contextmanager
def maybe_lock(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (other timing jobs wait), or nothing."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def graphs_made() -> int:
    return counters["stats"]["unique_graphs"]


def run(a: argparse.Namespace) -> list[Row]:
    logging.getLogger("qbackend").setLevel(logging.WARNING)
    base = build(a.shape, a.prompt_len + a.new_tokens + 8)
    ids = torch.randint(3, SHAPES[a.shape]["vocab_size"], (1, a.prompt_len), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=a.new_tokens, do_sample=False, cache_implementation="static",
              max_cache_len=a.prompt_len + a.new_tokens + 8)  # fmt: skip
    options = {} if a.min_params is None else {"min_params": a.min_params}
    if a.compute:
        options["compute"] = a.compute
    models = methods(base, a.presets.split(","), options)
    rows = {name: Row(name) for name in models}
    tokens: dict[str, torch.Tensor] = {}
    calls: dict[str, Callable[[], object]] = {}
    for name, m in models.items():
        before, t0 = graphs_made(), time.perf_counter()
        with torch.inference_mode():
            tokens[name] = m.generate(ids, **kw)
        rows[name].setup_s = time.perf_counter() - t0
        rows[name].compiles_setup = graphs_made() - before
        rows[name].module_mb = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]) / 1e6
        calls[name] = _call(m, ids, kw)
    before = graphs_made()
    with maybe_lock(a.lock):
        print(f"# timing: {_common.load_line('load average before timing')}", flush=True)
        samples = _common.interleaved(calls, a.rounds, 1, alternate=True)
        print(f"# timing: {_common.load_line('load average after timing')}", flush=True)
    timed_compiles = graphs_made() - before
    med = _common.medians(samples)
    for name, r in rows.items():
        r.tokens_per_s = a.new_tokens / med[name]
        r.vs_fp32_eager = med["fp32 eager"] / med[name]
        if name != "fp32 eager":
            r.same_tokens, r.first_diff = compare(tokens[name], tokens[reference_of(name)], a.prompt_len)
        r.compiles_timed = timed_compiles  # all methods' timed calls together (any > 0 is a bug)
    return list(rows.values())


def compare(tokens: torch.Tensor, ref: torch.Tensor, prompt_len: int) -> tuple[bool, int | None]:
    """(equal, index of the first differing new token or None)."""
    diff = (tokens != ref).nonzero()
    return len(diff) == 0, (int(diff[0, 1]) - prompt_len if len(diff) else None)


def _call(m: torch.nn.Module, ids: torch.Tensor, kw: dict) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return m.generate(ids, **kw)

    return call


def table(rows: list[Row]) -> str:
    lines = ["| method | tokens/s | vs fp32 eager | same tokens | set-up s | compiles (set-up / timed) | module MB |",
             "|---|---:|---:|---|---:|---|---:|"]  # fmt: skip
    for r in rows:
        same = "(ref)" if r.same_tokens is None else ("yes" if r.same_tokens else f"from token {r.first_diff}")
        lines.append(f"| {r.method} | {r.tokens_per_s:.1f} | {r.vs_fp32_eager:.2f}x | {same} | {r.setup_s:.1f} | "
                     f"{r.compiles_setup} / {r.compiles_timed} | {r.module_mb:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--presets", default="nf4,int4,int8", help="comma list of qbackend presets")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-params", type=int, default=None, help="qbackend min_params (0 for the tiny shape)")
    ap.add_argument("--compute", default=None, help="qbackend compute mode (default: auto)")
    ap.add_argument("--lock", default=None, help="flock this file around the timed rounds only")
    ap.add_argument("--json", default="", help="write machine, settings and rows as JSON here")
    _common.add_threads_option(ap)
    a = ap.parse_args(argv)
    _common.apply_threads(a)
    info = _common.machine_info()
    print(_common.header(info, f"threads: {torch.get_num_threads()}"), flush=True)
    rows = run(a)
    print(f"\n{a.shape} Llama, batch 1, prompt {a.prompt_len}, {a.new_tokens} new tokens, greedy, static cache; "
          f"median of {a.rounds} rounds\n")  # fmt: skip
    print(table(rows))
    if a.json:
        _common.write_json(a.json, {"machine": info, "settings": vars(a), "rows": [asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
