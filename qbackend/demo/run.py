"""``qbackend demo``: the README's main job on the real all-MiniLM-L6-v2 model.

Quantizes the model's linear layers (``qbackend.quantize_``, then ``torch.compile(backend="qbackend")``)
and compares with fp32 eager and fp32 Inductor: model size, bits per parameter of the linear
weights, latency at batch 1 and 32, and the cosine of the sentence embeddings to fp32 on
``EVALUATION_SENTENCES``. Each compile takes ~3-10 s on 2 cores; the default run does 8.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import nn

from ..core import registry
from ..passes.calibration import calibrate
from ..serialization.source import quantized_module
from . import ort
from .llm import LLMResult, run_llm_decode
from .minilm import embedding_quality, load_minilm, pooled_embeddings
from .sentences import CALIBRATION_SENTENCES, EVALUATION_SENTENCES

DEFAULT_PRESETS: tuple[str, ...] = ("nf4", "int8", "w8a8")
WEIGHT_ONLY_PRESETS: tuple[str, ...] = ("nf4", "fp4", "int4", "int4-g64", "int8")
#: every preset the demo runs: the weight-only ones and W8A8 (SmoothQuant, calibrated on the demo's
#: calibration sentences)
DEMO_PRESETS: tuple[str, ...] = (*WEIGHT_ONLY_PRESETS, "w8a8")
BATCHES: tuple[int, ...] = (1, 32)


@dataclass
class DemoOptions:
    presets: tuple[str, ...] = DEFAULT_PRESETS
    batches: tuple[int, ...] = BATCHES
    compile: bool = True  # False: quantized layers run eagerly and there is no Inductor row (fast)
    time_budget_s: float = 2.0  # per latency measurement, after the warm-up call
    min_runs: int = 3
    ort: bool = True  # ONNX Runtime's fp32 / 4-bit / int8 MiniLM side by side (where onnxruntime imports)
    llm: bool = True  # the small-Llama decode table
    compute: str = "auto"  # the quantized layers' arithmetic (QuantConfig.compute)


@dataclass
class DemoRow:
    name: str  # "fp32 eager", "fp32 Inductor", "qbackend nf4"
    size_mb: float  # all tensors the model holds
    linear_mb: float  # the linear layers' weights (codes and constants when quantized)
    linear_bits_per_param: float
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch -> median ms per call
    speedup: dict[int, float] = field(default_factory=dict)  # batch -> fp32 eager time / this time
    quality: dict[str, float] = field(default_factory=dict)  # cosine_mean, cosine_min, similarity_corr
    compile_s: float = 0.0
    compute: dict[str, int] = field(default_factory=dict)  # resolved compute mode -> quantized layers using it
    kernel_copies_mb: float = 0.0  # kernel-layout weight copies made on first use, on top of size_mb


@dataclass
class DemoResult:
    model: str
    params: int
    sentences: int
    threads: int
    rows: list[DemoRow]
    seconds: float = 0.0
    llm: LLMResult | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Step = Callable[[str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _no_progress(_: str) -> Iterator[None]:
    yield


def run_demo(options: DemoOptions | None = None, step: Step = _no_progress) -> DemoResult:
    """Run the comparison; ``step(description)`` wraps each stage (the CLI shows it as progress).

    Every variant is built (and compiled: the warm-up call of each batch) first; then the timing
    rounds are interleaved (one call of every variant at every batch size per round), so a change of
    machine load hits all rows alike; latency = the median over rounds.
    """
    opts = options or DemoOptions()
    t0 = time.perf_counter()
    with step("loading all-MiniLM-L6-v2"):
        ml = load_minilm()
    base = ml.model
    batches = {b: ml.tokenize(_sentences(EVALUATION_SENTENCES, b)) for b in opts.batches}
    n_eval = len(EVALUATION_SENTENCES)
    variants: list[tuple[str, Callable[[], nn.Module]]] = [("fp32 eager", lambda: base)]
    if opts.compile:
        variants.append(("fp32 Inductor", lambda: torch.compile(base, dynamic=False)))
    for preset in opts.presets:
        variants.append((f"qbackend {preset}", _quantized(base, preset, opts.compile, opts.compute, ml)))

    rows: list[DemoRow] = []
    models: list[nn.Module] = []
    reference = None
    # every variant is a Dynamo cache entry of the same forward per batch size: keep them all for the rounds
    limits = {"recompile_limit": max(torch._dynamo.config.recompile_limit, 4 * len(variants) * len(batches)),
              "accumulated_recompile_limit": max(torch._dynamo.config.accumulated_recompile_limit, 1024)}  # fmt: skip
    with torch._dynamo.config.patch(limits):
        for name, make in variants:
            with step(f"{name}: preparing"):
                model = make()
            size, lin_bytes, lin_numel = _sizes(model)
            row = DemoRow(name, size / 1e6, lin_bytes / 1e6, 8 * lin_bytes / max(lin_numel, 1))
            row.compute = _compute_modes(model)
            copies = _kernel_copies()
            emb = None
            for b, batch in batches.items():
                with step(f"{name}: {'compiling + ' if 'eager' not in name and opts.compile else ''}"
                          f"warm-up, batch {b}"):  # fmt: skip
                    t = time.perf_counter()
                    out = _embed(model, batch)
                    row.compile_s += time.perf_counter() - t
                    if b == n_eval:  # the batch of all evaluation sentences: its embeddings are the quality check
                        emb = out
            if emb is None:
                emb = _embed(model, ml.tokenize(EVALUATION_SENTENCES))
            if reference is None:
                reference = emb
            row.quality = embedding_quality(reference, emb)
            row.kernel_copies_mb = (_kernel_copies() - copies) / 1e6  # every model stays alive: its copies too
            rows.append(row)
            models.append(model)
        budget = opts.time_budget_s * len(rows) * len(batches)
        with step(f"timing: interleaved rounds, {budget:.0f} s"):
            calls = {(i, b): (lambda m=m, batch=batch: _embed(m, batch))
                     for i, m in enumerate(models) for b, batch in batches.items()}  # fmt: skip
            medians, n_rounds = _interleaved_medians_ms(calls, budget, opts.min_runs)
        for (i, b), ms in medians.items():
            rows[i].latency_ms[b] = ms
    del models
    torch._dynamo.reset()  # free the compiled graphs
    notes: list[str] = [f"latency: median of {n_rounds} interleaved rounds (one call of every row per round)"]
    if opts.ort:
        why = ort.unavailable()
        if why:
            notes.append(f"ONNX Runtime rows skipped: {why}")
        else:
            rows += _ort_rows(ml, batches, reference, opts, step)
    for r in rows:
        r.speedup = {b: rows[0].latency_ms[b] / r.latency_ms[b] for b in r.latency_ms}
    llm = None
    if opts.llm:
        with step("small Llama: greedy decoding, fp32 vs qbackend"):
            llm = run_llm_decode(tuple(p for p in opts.presets if p in ("nf4", "int8", "int4", "fp4")) or ("nf4",))
    params = sum(p.numel() for p in base.parameters())
    return DemoResult("all-MiniLM-L6-v2", params, len(EVALUATION_SENTENCES), torch.get_num_threads(), rows,
                      time.perf_counter() - t0, llm, notes)  # fmt: skip


def demo_steps(opts: DemoOptions) -> int:
    """How many ``step`` stages :func:`run_demo` runs for ``opts`` (for a progress bar)."""
    variants = 1 + int(opts.compile) + len(opts.presets)
    ort_steps = 1 + 3 * len(opts.batches) if opts.ort else 0
    return 1 + variants * (1 + len(opts.batches)) + 1 + ort_steps + int(opts.llm)


def _ort_rows(ml: Any, batches: dict[int, dict[str, torch.Tensor]], reference: torch.Tensor | None,
              opts: DemoOptions, step: Step) -> list[DemoRow]:  # fmt: skip
    """ONNX Runtime's fp32, 4-bit and dynamic-int8 MiniLM, timed and checked like the torch rows."""
    with step("ONNX Runtime: export and quantize"):
        fp32 = ort.export_encoder(ml.model, next(iter(batches.values())))
        variants = {
            "ONNX Runtime fp32": fp32,
            f"ONNX Runtime 4-bit (MatMulNBits b{ort.ORT_BLOCK}, int8 act)": ort.to_matmul_nbits(fp32),
            "ONNX Runtime int8 (quantize_dynamic, MatMuls)": ort.to_dynamic_int8(fp32),
        }
    eval_batch = ml.tokenize(EVALUATION_SENTENCES)
    rows = []
    for name, data in variants.items():
        run = ort.session(data, torch.get_num_threads())
        size, lin = ort.weight_bytes(data)
        lin_numel = sum(m.weight.numel() for m in ml.model.modules() if isinstance(m, nn.Linear))
        row = DemoRow(name, size / 1e6, lin / 1e6, 8 * lin / max(lin_numel, 1))

        def embed(batch: dict[str, torch.Tensor], run: Callable = run) -> torch.Tensor:
            hidden = run(batch)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled.float(), dim=-1)

        for b, batch in batches.items():
            with step(f"{name}: timing batch {b}"):
                embed(batch)
                row.latency_ms[b] = _median_ms(lambda batch=batch, embed=embed: embed(batch), opts.time_budget_s,
                                               opts.min_runs)  # fmt: skip
        if reference is not None:
            row.quality = embedding_quality(reference, embed(eval_batch))
        rows.append(row)
    return rows


def _sentences(pool: tuple[str, ...], n: int) -> list[str]:
    return [pool[i % len(pool)] for i in range(n)]


def _quantized(base: nn.Module, preset: str, compile_: bool, compute: str = "auto",
               ml: Any = None) -> Callable[[], nn.Module]:  # fmt: skip
    def make() -> nn.Module:
        if preset not in DEMO_PRESETS:
            raise ValueError(f"the demo runs the presets {', '.join(DEMO_PRESETS)}; got {preset!r}")
        if preset == "w8a8":  # SmoothQuant: per-channel activation ranges from the calibration sentences
            cal_batches = [ml.tokenize(CALIBRATION_SENTENCES[i:i + 16])
                           for i in range(0, len(CALIBRATION_SENTENCES), 16)]  # fmt: skip
            calibration = calibrate(base, cal_batches, progress=False)
            options: dict[str, Any] = {"preset": "w8a8", "calibration": calibration}
        else:
            options = {"preset": preset, "compute": compute}
        model, _ = quantized_module(base, options)  # shares the float embeddings/norms with base
        return torch.compile(model, backend="qbackend", dynamic=False) if compile_ else model

    return make


def _compute_modes(model: nn.Module) -> dict[str, int]:
    """Resolved compute mode -> number of quantized layers running in it."""
    out: dict[str, int] = {}
    for m in getattr(model, "_orig_mod", model).modules():
        mode = getattr(m, "compute", None)
        if isinstance(mode, str):
            out[mode] = out.get(mode, 0) + 1
    return out


def _embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return pooled_embeddings(model, batch)


def _median_ms(fn: Callable[[], Any], budget_s: float, min_runs: int = 3, max_runs: int = 50) -> float:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _interleaved_medians_ms(calls: dict[Any, Callable[[], Any]], budget_s: float, min_rounds: int = 3,
                            max_rounds: int = 200) -> tuple[dict[Any, float], int]:  # fmt: skip
    """Median ms per call of each of ``calls``, timed in rounds (one call of each per round) until
    ``budget_s`` is spent (at least ``min_rounds``); returns the medians and the number of rounds."""
    times: dict[Any, list[float]] = {k: [] for k in calls}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget_s):
        for key, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
        rounds += 1
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}, rounds


def _kernel_copies() -> int:
    """Bytes of the CPU kernels' weight copies alive now (0 where the CPU kernels are not in use)."""
    from ..kernels import cpu

    return cpu.packed_nbytes()


def _sizes(model: nn.Module) -> tuple[int, int, int]:
    """(bytes of all tensors, bytes of the linear weights, elements of the linear weights); shared tensors once."""
    model = getattr(model, "_orig_mod", model)
    seen: set[int] = set()

    def nbytes(ts: Any) -> int:
        total = 0
        for t in ts:
            if t is None or t.untyped_storage().data_ptr() in seen:
                continue
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return total

    lin_bytes = lin_numel = 0
    quantized = registry.module_types()  # any workflow's quantized layer
    for m in model.modules():
        if isinstance(m, quantized):
            lin_bytes += nbytes(m.buffers(recurse=False))
            lin_numel += m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            lin_bytes += nbytes([m.weight])
            lin_numel += m.weight.numel()
    rest = nbytes([*model.parameters(), *model.buffers()])
    return lin_bytes + rest, lin_bytes, lin_numel


def render(result: DemoResult) -> Table:
    """A rich Table of the result."""
    t = Table(
        title=f"qbackend demo: {result.model} ({result.params / 1e6:.1f}M params), CPU, {result.threads} threads",
        caption=f"latency: median per call, interleaved rounds (embeddings of a batch); cosine: vs fp32 on "
        f"{result.sentences} evaluation sentences; size + N: N MB of kernel-layout weight copies made on first "
        f"use (int8 layers; off: kernels.cpu.w8a8/int16_compute.PACKING = False); total {result.seconds:.0f} s",
        title_justify="left",
    )
    t.add_column("model")
    t.add_column("size MB", justify="right")
    t.add_column("linear weights MB", justify="right")
    t.add_column("bits/param (linears)", justify="right")
    batches = sorted(result.rows[0].latency_ms) if result.rows else []
    for b in batches:
        t.add_column(f"batch {b} ms (speed-up)", justify="right")
    t.add_column("cosine mean / min", justify="right")
    for r in result.rows:
        modes = ", ".join(f"{m} x{n}" if len(r.compute) > 1 else m for m, n in sorted(r.compute.items()))
        name = r.name + (f" (compute {modes})" if modes else "")
        size = f"{r.size_mb:.1f}" + (f" + {r.kernel_copies_mb:.1f}" if r.kernel_copies_mb >= 0.05 else "")
        cells = [name, size, f"{r.linear_mb:.2f}", f"{r.linear_bits_per_param:.2f}"]
        cells += [f"{r.latency_ms[b]:.1f} ({r.speedup[b]:.2f}x)" for b in batches]
        q = r.quality
        cells.append(f"{q['cosine_mean']:.4f} / {q['cosine_min']:.4f}")
        t.add_row(*cells)
    return t


def render_llm(result: DemoResult) -> Table | None:
    """A rich Table of the small-Llama decode rows, or None when they were not run."""
    llm = result.llm
    if llm is None:
        return None
    t = Table(
        title=f"greedy decoding, small random-weight Llama ({llm.params / 1e6:.0f}M params), batch 1, "
        f"{result.threads} threads",
        caption=f"{llm.steps} tokens after a {llm.prompt}-token prompt; tokens/s median of interleaved runs; "
        "logits cosine: next-token logits after the prompt vs fp32; weights + N: kernel-layout copies",
        title_justify="left",
    )
    for col in ("model", "weights MB", "tokens/s", "speed-up", "logits cosine"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in llm.rows:
        mb = f"{r.weights_mb:.0f}" + (f" + {r.kernel_copies_mb:.0f}" if r.kernel_copies_mb >= 0.5 else "")
        t.add_row(r.name, mb, f"{r.tokens_per_s:.1f}", f"{r.speedup:.2f}x", f"{r.logits_cosine:.4f}")
    return t
