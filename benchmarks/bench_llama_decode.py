"""Greedy decoding tokens/s of a Llama-architecture model: float vs qbackend, batch 1 and 16, one process.

The model is ``transformers.LlamaForCausalLM`` built from a config with random weights (no download):
``llama3-8b`` has Llama-3-8B's dims (hidden 4096, intermediate 14336, 32 heads / 8 KV heads, vocab
128256; ``--layers`` cuts the depth to fit a time budget), ``small`` is a CPU-sized model (hidden 1024,
4 layers, vocab 32000), ``tiny`` is for tests. Methods, all on the same weights:

* the float model eagerly and under ``torch.compile`` (Inductor): bf16 on CUDA, fp32 and bf16 on CPU;
* ``torch.compile(model, backend="qbackend", options={"preset": p})`` for p in nf4 / int4 / int8;
* ``qbackend.quantize_(copy, p)`` + the same compile: the memory-saving form (no float weights kept);
* on CUDA, each compiled method also with CUDA graphs (``mode="reduce-overhead"``; for qbackend as
  the option ``options={"mode": ...}``, since ``torch.compile`` refuses ``mode`` with ``options``).

Decoding: a ``StaticCache`` per (method, batch) allocated once, so every decode step has the same
shapes and static buffer addresses (one graph, no recompiles, CUDA graphs possible). The prompt is
fed one token per call by default, so prefill runs the same graph as decoding (``--prefill batched``
compiles a second, prompt-shaped graph). Then ``--steps`` greedy steps are timed: tokens/s =
batch * steps / time, argmax included. Warm-up runs (compilation) are excluded; the timed repeats
interleave the methods, and each figure is the median over repeats.

Correctness, against the float model run eagerly (fp32 on CPU, bf16 on CUDA): ``greedy match`` is the
share of generated tokens equal to the reference's when each method decodes freely (after a first
difference the contexts differ, so this mostly measures how soon one happens: ``prefix`` is the
mean count of identical leading tokens); ``top-1`` and the logits cosine come from a teacher-forced
run fed the reference's tokens, so every step has the same context. On a random-weight model the
top logits are close together, so the float-vs-float rows (bf16 vs fp32, compiled vs eager) give
the noise floor to read the quantized rows against.

Compiles are counted with ``torch._dynamo.utils.counters`` (graphs made during warm-up, and during
the timed runs, which must be 0).

    python benchmarks/bench_llama_decode.py                          # CPU: small preset; CUDA: llama3-8b
    python benchmarks/bench_llama_decode.py --shape llama3-8b --layers 8 --out decode.json
    python benchmarks/bench_llama_decode.py --shape tiny --steps 3 --repeats 1 --min-params 0   # plumbing only
    python benchmarks/bench_llama_decode.py --list-methods --device cuda   # what would run, as JSON
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import _common

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32, vocab_size=128256),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                  num_hidden_layers=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=512),
}  # fmt: skip
PRESETS = ("nf4", "int4", "int8")
FORMS = ("eager", "inductor", "qbackend", "quantize_")  # the default set
# Not in the default set: quantize_ without compiling (the memory-saving form run eagerly; quick to set up).
EXTRA_FORMS = ("quantize_-eager",)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Method:
    """One way of running the model. ``preset`` None is the float model."""

    name: str
    dtype: torch.dtype
    compiled: bool
    preset: str | None = None
    swap: bool = False  # qbackend.quantize_ a copy first: the memory-saving form
    graphs: bool = False  # CUDA graphs


@dataclass
class Row:
    batch: int
    method: str
    dtype: str
    form: str
    graphs: bool
    tokens_per_s: float | None = None
    ms_per_step: float | None = None
    vs_eager: float | None = None  # tokens/s over the reference (float, eager)
    vs_compiled: float | None = None  # over the float model compiled by Inductor (same graphs setting)
    compiles_warmup: int | None = None  # graphs Dynamo made in this method's warm-up
    recompiles_timed: int | None = None  # graphs made during the timed runs (should be 0)
    graph_breaks: int | None = None
    greedy_match: float | None = None
    greedy_prefix: float | None = None
    top1: float | None = None  # teacher forced
    logits_cos: list[float] = field(default_factory=list)  # teacher forced, first steps, mean over the batch
    logits_cos_min: float | None = None
    setup_s: float | None = None  # first run: quantization + compilation + one decode
    module_mb: float | None = None  # parameters + buffers of the module that runs
    note: str = ""


@dataclass
class Decoded:
    tokens: torch.Tensor  # [B, steps + 1]: argmax after the prompt and after each decode step
    logits: list[torch.Tensor]  # fp32 [B, vocab] of the first kept positions
    seconds: float  # the decode steps only (prefill excluded)


# ---- model and cache --------------------------------------------------------------------------------------


def llama_config(shape: str, layers: int | None = None) -> Any:
    from transformers import LlamaConfig

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    # Llama-3 keeps a separate lm_head; tying would make quantize_ keep the float embedding alive for it.
    return LlamaConfig(**dims, tie_word_embeddings=False, max_position_embeddings=4096)


def build_model(cfg: Any, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: an 8B random init on the CPU takes minutes
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed forward's ``past_key_values`` to ``cache`` (5.2x); use what this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(cfg: Any, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> Any:
    """A StaticCache allocated now, outside any compiled region, so its buffers get static addresses."""
    from transformers import StaticCache

    if not hasattr(StaticCache, "early_initialization"):
        raise RuntimeError("bench_llama_decode needs transformers >= 5 (StaticCache.early_initialization)")
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, dtype, device)
    return cache


def module_mb(module: torch.nn.Module) -> float:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


# ---- methods ----------------------------------------------------------------------------------------------


def method_list(
    device: torch.device, presets: Sequence[str], forms: Sequence[str], graphs: Sequence[bool]
) -> list[Method]:
    """The reference (float, eager, first dtype) first: every correctness figure compares with it."""
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    base = dtypes[0]
    out = [Method(f"{DTYPE_NAMES[dt]} eager", dt, compiled=False) for dt in dtypes]
    if "eager" not in forms:
        out = out[:1]  # the reference always runs
    for g in graphs:
        sfx = " +graphs" if g else ""
        if "inductor" in forms:
            out += [Method(f"{DTYPE_NAMES[dt]} inductor{sfx}", dt, compiled=True, graphs=g) for dt in dtypes]
        if "qbackend" in forms:
            out += [Method(f"qbackend {p}{sfx}", base, compiled=True, preset=p, graphs=g) for p in presets]
        if "quantize_" in forms:
            out += [Method(f"quantize_ {p} + qbackend{sfx}", base, compiled=True, preset=p, swap=True, graphs=g)
                    for p in presets]  # fmt: skip
    if "quantize_-eager" in forms:
        out += [Method(f"quantize_ {p} eager", base, compiled=False, preset=p, swap=True) for p in presets]
    return out


class Models:
    """The float model per dtype and the quantize_d copy per preset, each built once and shared."""

    def __init__(self, cfg: Any, base_dtype: torch.dtype, device: torch.device, options: dict[str, Any]) -> None:
        self.cfg, self.device, self.options = cfg, device, options
        self.base_dtype = base_dtype
        self._float: dict[torch.dtype, torch.nn.Module] = {base_dtype: build_model(cfg, base_dtype, device)}
        self._swapped: dict[str, torch.nn.Module] = {}

    def float(self, dtype: torch.dtype) -> torch.nn.Module:
        if dtype not in self._float:  # same weights, cast: the float rows differ only in precision
            self._float[dtype] = copy.deepcopy(self._float[self.base_dtype]).to(dtype)
        return self._float[dtype]

    def swapped(self, preset: str) -> torch.nn.Module:
        if preset not in self._swapped:
            import qbackend

            model = copy.deepcopy(self._float[self.base_dtype])
            qbackend.quantize_(model, {"preset": preset, **self.options})
            self._swapped[preset] = model
        return self._swapped[preset]

    def module(self, m: Method) -> torch.nn.Module:
        return self.swapped(m.preset) if m.swap else self.float(m.dtype)


def compile_method(model: torch.nn.Module, m: Method, options: dict[str, Any]) -> Callable[..., Any]:
    """``torch.compile`` as a user would write it, static shapes, recompiles tracked per call."""
    if not m.compiled:
        return model
    kw: dict[str, Any] = {"dynamic": False}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        kw["isolate_recompiles"] = True  # each method's entries apart; older torch: see _dynamo_limits
    if m.preset is None:
        return torch.compile(model, mode="reduce-overhead" if m.graphs else None, **kw)
    opts: dict[str, Any] = {"preset": m.preset, **options}
    if m.graphs:
        opts["mode"] = "reduce-overhead"  # qbackend's option: torch.compile refuses mode= with options=
    return torch.compile(model, backend="qbackend", options=opts, **kw)


def _dynamo_limits(n_methods: int) -> dict[str, Any]:
    """Dynamo config for the run. All methods compile the same forward code object: without isolation
    they share its recompile limit (8), and hitting it would silently run eagerly. Raise it, and make
    hitting it an error."""
    cfg = torch._dynamo.config
    patch: dict[str, Any] = {
        "recompile_limit": max(cfg.recompile_limit, 4 * n_methods),
        "accumulated_recompile_limit": max(cfg.accumulated_recompile_limit, 8 * n_methods),
    }
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    return patch


def _register_backend() -> None:
    """The backend is registered by an entry point; a checkout that is not pip-installed lacks it."""
    import qbackend.core.backend

    if "qbackend" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(qbackend.core.backend.qbackend, name="qbackend")


# ---- decoding ---------------------------------------------------------------------------------------------


class Stepper:
    """One forward call on ``[B, T]`` token ids through the static cache -> last position's logits."""

    def __init__(self, fn: Callable[..., Any], cache: Any, cache_kw: str, graphs: bool) -> None:
        self.fn, self.cache, self.cache_kw, self.graphs = fn, cache, cache_kw, graphs

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.graphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(input_ids=ids, use_cache=True, **{self.cache_kw: self.cache})
        return out.logits[:, -1]


def columns(ids: torch.Tensor) -> list[torch.Tensor]:
    """``[B, T]`` -> T fresh ``[B, 1]`` tensors with the strides of an argmax output (a stride
    difference would be a guard failure, i.e. a recompile)."""
    return [ids[:, t : t + 1].clone(memory_format=torch.contiguous_format) for t in range(ids.shape[1])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(
    step: Stepper, prompt: list[torch.Tensor], steps: int, device: torch.device,
    forced: list[torch.Tensor] | None = None, keep: int = 0,
) -> Decoded:  # fmt: skip
    """Reset the cache, feed the prompt, then ``steps`` greedy steps (timed). ``forced``: feed these
    tokens instead of the model's own (teacher forcing). ``keep``: logits of the first positions."""
    step.cache.reset()
    kept: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    with torch.no_grad():
        for ids in prompt:
            logits = step(ids)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps + 1):
            tok = logits.argmax(-1, keepdim=True)
            tokens.append(tok)
            if i < keep:
                kept.append(logits.float().clone())  # clone: a CUDA graph reuses its output buffer
            if i == steps:
                break
            logits = step(tok if forced is None else forced[i])
        _sync(device)
        seconds = time.perf_counter() - t0
    return Decoded(torch.cat(tokens, dim=1), kept, seconds)


def agreement(ref: Decoded, free: Decoded, forced: Decoded) -> dict[str, Any]:
    """Greedy-token agreement (free running and teacher forced) and logits cosine vs the reference."""
    same = (free.tokens == ref.tokens).to(torch.int64)
    cos = [F.cosine_similarity(a, b, dim=-1) for a, b in zip(forced.logits, ref.logits, strict=False)]
    return {
        "greedy_match": same.float().mean().item(),
        "greedy_prefix": same.cumprod(dim=1).sum(dim=1).float().mean().item(),
        "top1": (forced.tokens == ref.tokens).float().mean().item(),
        "logits_cos": [round(c.mean().item(), 6) for c in cos],
        "logits_cos_min": min(c.min().item() for c in cos) if cos else None,
    }


def _graphs_made() -> int:
    return int(counters["stats"]["unique_graphs"])


def _graph_breaks() -> int:
    return int(sum(counters["graph_break"].values()))


# ---- the benchmark ----------------------------------------------------------------------------------------


@dataclass
class _Live:
    """A method being measured at one batch size."""

    method: Method
    step: Stepper
    row: Row
    times: list[float] = field(default_factory=list)


def _row(m: Method, batch: int) -> Row:
    form = "quantize_" if m.swap else ("qbackend" if m.preset else ("inductor" if m.compiled else "eager"))
    return Row(batch=batch, method=m.name, dtype=DTYPE_NAMES[m.dtype], form=form, graphs=m.graphs)


def _error(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"failed: {type(e).__name__}: {first}"[:300]


def _warm_up(live: _Live, ref: Decoded | None, prompt: list[torch.Tensor], steps: int, device: torch.device,
             keep: int) -> Decoded:  # fmt: skip
    """Compile (first run, free greedy), teacher-forced run, and with CUDA graphs one more run; counts graphs."""
    g0, b0, t0 = _graphs_made(), _graph_breaks(), time.perf_counter()
    free = decode(live.step, prompt, steps, device, keep=keep)
    live.row.setup_s = time.perf_counter() - t0
    ref = ref or free
    forced = decode(live.step, prompt, steps, device, forced=columns(ref.tokens[:, :steps]), keep=keep)
    if live.method.graphs:  # CUDA graph trees record on a later call than the first
        decode(live.step, prompt, steps, device)
    live.row.compiles_warmup = _graphs_made() - g0
    live.row.graph_breaks = _graph_breaks() - b0
    for k, v in agreement(ref, free, forced).items():
        setattr(live.row, k, v)
    return free


def bench_batch(
    models: Models, fns: dict[str, Callable[..., Any]], methods: list[Method], batch: int, prompt_len: int,
    steps: int, repeats: int, device: torch.device, prefill: str, keep: int,
) -> list[Row]:  # fmt: skip
    """All methods at one batch size: warm up each, then ``repeats`` interleaved timed rounds."""
    cfg = models.cfg
    gen = torch.Generator().manual_seed(1234 + batch)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen).to(device)
    prompt = columns(ids) if prefill == "steps" else [ids.contiguous()]
    cache_kw = cache_kwarg(models.float(models.base_dtype))
    ref: Decoded | None = None
    live: list[_Live] = []
    rows: list[Row] = []
    for m in methods:
        row = _row(m, batch)
        rows.append(row)
        try:
            cache = new_cache(cfg, batch, prompt_len + steps + 1, m.dtype, device)
            lv = _Live(m, Stepper(fns[m.name], cache, cache_kw, m.graphs), row)
            row.module_mb = module_mb(models.module(m))
            free = _warm_up(lv, ref, prompt, steps, device, keep)
        except Exception as e:  # noqa: BLE001 - one method failing must not lose the others' figures
            if ref is None:
                raise  # without the reference there is nothing to compare with
            row.note = _error(e)
            print(f"  batch {batch} {m.name}: {row.note}", file=sys.stderr, flush=True)
            continue
        ref = ref or free
        live.append(lv)
        print(f"  batch {batch} {m.name}: warm ({row.setup_s:.1f} s, {row.compiles_warmup} graphs)",
              file=sys.stderr, flush=True)  # fmt: skip
    _timed_rounds(live, prompt, steps, repeats, device)
    _fill_speed(rows, live, batch, steps)
    return rows


def _timed_rounds(live: list[_Live], prompt: list[torch.Tensor], steps: int, repeats: int,
                  device: torch.device) -> None:  # fmt: skip
    """Interleaved: a burst of load from other processes hits every method alike."""
    for lv in live:
        lv.row.recompiles_timed = 0
    for _ in range(repeats):
        for lv in live:
            if lv.row.note:
                continue
            g0 = _graphs_made()
            try:
                lv.times.append(decode(lv.step, prompt, steps, device).seconds)
            except Exception as e:  # noqa: BLE001
                lv.row.note = _error(e)
            lv.row.recompiles_timed += _graphs_made() - g0


def _fill_speed(rows: list[Row], live: list[_Live], batch: int, steps: int) -> None:
    for lv in live:
        if lv.times:
            t = statistics.median(lv.times)
            lv.row.tokens_per_s = batch * steps / t
            lv.row.ms_per_step = 1e3 * t / steps
    speed = {r.method: r.tokens_per_s for r in rows}
    eager = rows[0].tokens_per_s  # the reference
    for r in rows:
        compiled = speed.get(f"{r.dtype} inductor" + (" +graphs" if r.graphs else ""))
        if r.tokens_per_s is not None:
            r.vs_eager = None if not eager else r.tokens_per_s / eager
            r.vs_compiled = None if not compiled else r.tokens_per_s / compiled


def run(
    cfg: Any, methods: list[Method], batches: Sequence[int], *, prompt_len: int = 16, steps: int = 32,
    repeats: int = 3, device: torch.device | str = "cpu", prefill: str = "steps", keep: int = 4,
    options: dict[str, Any] | None = None, on_batch: Callable[[list[Row]], None] | None = None,
) -> list[Row]:  # fmt: skip
    """The benchmark's core: every method at every batch size; rows in order (batch, method).

    ``options``: extra qbackend options for every quantized method (e.g. ``{"min_params": 0}`` for a
    tiny model, ``{"exclude": ["lm_head"]}``). ``on_batch``: called with all rows so far after each batch.
    """
    device = torch.device(device)
    options = dict(options or {})
    if methods[0].compiled or methods[0].preset:
        raise ValueError("the first method must be the float eager reference")
    _register_backend()
    with torch._dynamo.config.patch(_dynamo_limits(len(methods))):  # restored after: a test shares the process
        return _run(cfg, methods, batches, prompt_len, steps, repeats, device, prefill, keep, options, on_batch)


def _run(
    cfg: Any, methods: list[Method], batches: Sequence[int], prompt_len: int, steps: int, repeats: int,
    device: torch.device, prefill: str, keep: int, options: dict[str, Any],
    on_batch: Callable[[list[Row]], None] | None,
) -> list[Row]:  # fmt: skip
    models = Models(cfg, methods[0].dtype, device, options)
    fns: dict[str, Callable[..., Any]] = {}
    for m in methods:  # built once: batch 16 reuses the compiled wrapper (a new static-shape graph)
        try:
            fns[m.name] = compile_method(models.module(m), m, options)
        except Exception as e:  # noqa: BLE001
            fns[m.name] = _failing(_error(e))
    rows: list[Row] = []
    for b in batches:
        rows += bench_batch(models, fns, methods, b, prompt_len, steps, repeats, device, prefill, keep)
        if on_batch is not None:
            on_batch(rows)
    return rows


def _failing(msg: str) -> Callable[..., Any]:
    def fn(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(msg)

    return fn


# ---- report -----------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {**_common.machine_info(device), "device": device.type}
    if device.type == "cuda":
        from qbackend.kernels.triton import autotune

        info["qbackend_triton_autotune"] = autotune.autotune_enabled()
    return info


_f = _common.fmt


def markdown(rows: list[Row]) -> str:
    head = (
        "| batch | method | tokens/s | ms/step | vs float eager | vs float Inductor | graphs warm-up / timed "
        "| greedy match (prefix) | top-1 (forced) | logits cos first steps (min) | setup s | MB |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        cos = ", ".join(f"{c:.4f}" for c in r.logits_cos)
        lines.append(
            f"| {r.batch} | {r.method} | {_f(r.tokens_per_s, '.1f')} | {_f(r.ms_per_step, '.2f')} | "
            f"{_f(r.vs_eager, '.2f', 'x')} | {_f(r.vs_compiled, '.2f', 'x')} | {_f(r.compiles_warmup, 'd')} / "
            f"{_f(r.recompiles_timed, 'd')} | {_f(r.greedy_match, '.2f')} ({_f(r.greedy_prefix, '.1f')}) | "
            f"{_f(r.top1, '.2f')} | {cos} ({_f(r.logits_cos_min, '.4f')}) | {_f(r.setup_s, '.1f')} | "
            f"{_f(r.module_mb, '.0f')} |" + (f" {r.note}" if r.note else "")
        )
    return "\n".join(lines)


def write_json(path: str, info: dict[str, Any], settings: dict[str, Any], rows: list[Row]) -> None:
    _common.write_json(path, {"machine": info, "settings": settings, "rows": [asdict(r) for r in rows]}, announce=False)


def _csv(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: llama3-8b on CUDA, small on CPU")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (cut depth to fit the time)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 128 CUDA, 32 CPU)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma list from {FORMS + EXTRA_FORMS}")
    ap.add_argument("--graphs", choices=["off", "on", "both"], default=None, help="CUDA graphs (default: both on CUDA)")
    ap.add_argument("--prefill", choices=["steps", "batched"], default="steps")
    ap.add_argument("--keep", type=int, default=4, help="teacher-forced steps whose logits cosine is reported")
    ap.add_argument("--exclude", default="", help="qbackend exclude list, comma separated (e.g. lm_head)")
    ap.add_argument("--min-params", type=int, default=None, help="qbackend min_params (0 for the tiny shape)")
    ap.add_argument("--weight-check", default=None, help="qbackend weight_check: sampled (default), full or version")
    ap.add_argument("--no-autotune", action="store_true", help="qbackend Triton kernels: heuristic configs")
    _common.add_threads_option(ap)
    ap.add_argument("--out", default="", help="write machine, settings and rows as JSON here")
    ap.add_argument("--list-methods", action="store_true", help="print the methods that would run (JSON) and exit")
    a = ap.parse_args(argv)
    _common.apply_threads(a)
    unknown = set(_csv(a.forms)) - set(FORMS + EXTRA_FORMS)
    if unknown:
        ap.error(f"unknown form {sorted(unknown)[0]!r}; valid: {', '.join(FORMS + EXTRA_FORMS)}")

    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))  # fmt: skip
    graphs_opt = a.graphs or ("both" if dev.type == "cuda" else "off")
    if graphs_opt != "off" and dev.type != "cuda":
        ap.error("--graphs needs CUDA")
    graphs = {"off": [False], "on": [True], "both": [False, True]}[graphs_opt]
    if a.list_methods:  # before the GPU check: lists what a machine with that device would run
        methods = method_list(dev, _csv(a.presets), _csv(a.forms), graphs)
        print(json.dumps([{**asdict(m), "dtype": DTYPE_NAMES[m.dtype]} for m in methods], indent=1))
        return 0
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_llama_decode: --device cuda but no CUDA GPU is available; nothing was measured.")
        return 0
    if a.no_autotune:
        os.environ["QBACKEND_TRITON_AUTOTUNE"] = "0"
    shape = a.shape or ("llama3-8b" if dev.type == "cuda" else "small")
    cfg = llama_config(shape, a.layers)
    steps = a.steps or (128 if dev.type == "cuda" else 32)
    methods = method_list(dev, _csv(a.presets), _csv(a.forms), graphs)
    options: dict[str, Any] = {"exclude": _csv(a.exclude)} if a.exclude else {}
    if a.min_params is not None:
        options["min_params"] = a.min_params
    if a.weight_check is not None:
        options["weight_check"] = a.weight_check
    settings = {"shape": shape, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                "intermediate": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size, "batches": a.batches,
                "steps": steps, "prompt_len": a.prompt_len, "repeats": a.repeats, "prefill": a.prefill,
                "options": options, "methods": [m.name for m in methods]}  # fmt: skip
    info = machine_info(dev)
    print(f"# {json.dumps(info)}\n# {json.dumps(settings)}", flush=True)

    def checkpoint(rows: list[Row]) -> None:  # partial results survive a run cut off by a time limit
        if a.out:
            write_json(a.out, {**info, "load_average_end": _common.load_average()}, settings, rows)

    rows = run(cfg, methods, [int(b) for b in _csv(a.batches)], prompt_len=a.prompt_len, steps=steps,
               repeats=a.repeats, device=dev, prefill=a.prefill, keep=a.keep, options=options,
               on_batch=checkpoint)  # fmt: skip
    if dev.type == "cuda":
        info["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    checkpoint(rows)
    print(markdown(rows))
    print(f"# {_common.load_line('load average at the end')}")
    if a.out:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
