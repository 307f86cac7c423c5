"""SmoothQuant W8A8 proof on the real MiniLM (all-MiniLM-L6-v2), through ``torch.compile(backend="qbackend")``.

1. Calibrate on CALIBRATION_SENTENCES (``qbackend.calibrate``), save and reload the result.
2. Compile the model with the "w8a8" preset in several variants: naive W8A8 (per-tensor static,
   per-token dynamic), SmoothQuant alpha 0.5 and per-layer searched alpha, and LLM.int8()-style
   outlier decomposition.
3. Compare sentence embeddings of the held-out EVALUATION_SENTENCES with fp32: mean/min cosine and
   the correlation of the pairwise-similarity matrices.

    python examples/smoothquant_minilm.py                      # every variant, full torch.compile
    python examples/smoothquant_minilm.py --no-inductor        # passes only, eager ops (quicker)
    python examples/smoothquant_minilm.py --variants naive-token sq-0.5-token
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from typing import Any

import torch

import qbackend
from qbackend.core.backend import run_passes
from qbackend.core.config import QuantConfig
from qbackend.demo import (
    CALIBRATION_SENTENCES,
    EVALUATION_SENTENCES,
    embedding_quality,
    load_minilm,
    pooled_embeddings,
)

# name -> (description, qbackend options without the calibration)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "naive-tensor": ("W8A8 naive, activations per-tensor static",
                     {"smoothquant": {"smooth": False, "activation": "tensor"}}),
    "naive-token": ("W8A8 naive, activations per-token", {"smoothquant": {"smooth": False}}),
    "sq-0.5-token": ("SmoothQuant alpha 0.5, per-token", {"smoothquant": {"alpha": 0.5}}),
    "sq-search-token": ("SmoothQuant searched alpha, per-token", {"smoothquant": {"search_alpha": True}}),
    "sq-search-tensor": ("SmoothQuant searched alpha, per-tensor static",
                         {"smoothquant": {"search_alpha": True, "activation": "tensor"}}),
    "naive-token-outliers": ("W8A8 naive per-token + outliers >= 6 in float",
                             {"smoothquant": {"smooth": False, "outlier_threshold": 6.0}}),
    "sq-0.5-token-outliers": ("SmoothQuant alpha 0.5 per-token + outliers >= 6 in float",
                              {"smoothquant": {"alpha": 0.5, "outlier_threshold": 6.0}}),
}  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=16, help="calibration batch size (sentences)")
    p.add_argument("--sample-tokens", type=int, default=512, help="input rows kept per layer for the alpha search")
    p.add_argument("--no-inductor", action="store_true", help="run qbackend's passes, then the graph eagerly")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    p.add_argument("--time", type=int, default=0, metavar="N",
                   help="also time the variants (and fp32 Inductor) on the evaluation batch: best of N interleaved "
                        "rounds (robust to other load on the machine)")
    return p.parse_args()


def compile_variant(model: torch.nn.Module, options: dict[str, Any], inductor: bool) -> torch.nn.Module:
    """``torch.compile`` with qbackend, or (``inductor=False``) its passes only, the graph then run eagerly."""
    if inductor:
        return torch.compile(model, backend="qbackend", options=options)
    config = QuantConfig.from_options(options)

    def passes_only(gm, example_inputs):
        run_passes(gm, config)
        return gm.forward

    return torch.compile(model, backend=passes_only)


def fold_report(model: torch.nn.Module, options: dict[str, Any], batch: dict) -> Any:
    """The SmoothQuant fold the backend does for ``options`` (None when not smoothing): the public way is
    ``qbackend.explain(...).sections["smoothquant"]``, one fold report per compiled graph."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    report = qbackend.explain(model, example_kwargs=kwargs, **options)
    return next(iter(report.sections.get("smoothquant", [])), None)


def best_ms(fns: dict[str, Any], batch: dict, rounds: int) -> dict[str, float]:
    """Best-of-``rounds`` latency of each (already compiled) callable, calls interleaved across them."""
    best = dict.fromkeys(fns, float("inf"))
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(**batch)
                best[name] = min(best[name], 1e3 * (time.perf_counter() - t0))
    return best


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    mm = load_minilm()
    model = mm.model
    cal_batches = [mm.tokenize(CALIBRATION_SENTENCES[i : i + args.batch])
                   for i in range(0, len(CALIBRATION_SENTENCES), args.batch)]  # fmt: skip
    t0 = time.perf_counter()
    result = qbackend.calibrate(model, cal_batches, sample_tokens=args.sample_tokens)
    t_cal = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:  # the saved form is what a deployment would load
        result.save(os.path.join(d, "minilm-calibration"))
        result = qbackend.CalibrationResult.load(os.path.join(d, "minilm-calibration.json"))
    print(f"calibrated in {t_cal:.1f}s: {result.summary()}")

    batch = mm.tokenize(EVALUATION_SENTENCES)
    with torch.no_grad():
        ref = pooled_embeddings(model, batch)
    rows = []
    compiled_fns: dict[str, Any] = {}
    # Every variant is a separate Dynamo cache entry of the same forward: keep them all alive for timing.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(VARIANTS))
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    for name in args.variants:
        desc, opts = VARIANTS[name]
        options = {"preset": "w8a8", "calibration": result, **opts}
        t0 = time.perf_counter()
        compiled = compile_variant(model, options, inductor=not args.no_inductor)
        with torch.no_grad():
            emb = pooled_embeddings(compiled, batch)
        q = embedding_quality(ref, emb)
        fold = fold_report(model, options, batch)
        smooth = "-"
        if fold is not None:
            smooth = f"{len(fold.exact)} exact / {len(fold.explicit)} multiply / {len(fold.skipped)} unsmoothed"
            alphas = sorted({g.choice.alpha for g in fold.groups if g.choice is not None and g.kind != "skipped"})
            if len(alphas) > 1:
                smooth += f"; alpha {min(alphas):g}..{max(alphas):g}"
        compiled_fns[name] = compiled
        rows.append((name, desc, q, smooth))
        print(f"{name:24s} cos {q['cosine_mean']:.5f} (min {q['cosine_min']:.5f})  sim-corr {q['similarity_corr']:.5f}"
              f"  [{smooth}]  ({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    times: dict[str, float] = {}
    if args.time:
        fp32 = torch.compile(model)
        with torch.no_grad():
            fp32(**batch)
        times = best_ms({"fp32-inductor": fp32, **compiled_fns}, dict(batch), args.time)
        for name, ms in times.items():
            print(f"{name:24s} {ms:8.1f} ms/call (best of {args.time}, {len(EVALUATION_SENTENCES)} sentences)")
    if args.markdown:
        how = "passes only, eager ops" if args.no_inductor else "torch.compile(backend=qbackend)"
        machine = platform.processor() or platform.machine()
        print(f"\n{datetime.date.today()} | {machine} | torch {torch.__version__} | {how}\n")
        print("| variant | embedding cosine mean | min | pairwise-similarity corr | smoothing groups | ms/call |")
        print("|---|---|---|---|---|---|")
        if "fp32-inductor" in times:
            print(f"| fp32, torch.compile (Inductor) | 1 | 1 | 1 | - | {times['fp32-inductor']:.0f} |")
        for name, desc, q, smooth in rows:
            cos, low, corr = q["cosine_mean"], q["cosine_min"], q["similarity_corr"]
            ms = f"{times[name]:.0f}" if name in times else "-"
            print(f"| {desc} | {cos:.5f} | {low:.5f} | {corr:.5f} | {smooth} | {ms} |")


if __name__ == "__main__":
    main()
