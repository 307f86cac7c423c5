"""The added output error of each ``compute`` mode on the real MiniLM, against the format's own error.

For every linear layer of all-MiniLM-L6-v2 (the demo's model), its real input activations (the demo's
sentences) and each weight format, three output errors relative to the float layer's output
``||x W^T||``:

* format: ``x W^T`` vs ``x dequant(W_q)^T`` computed exactly (fp32 compute): the format's own error;
* added (mode): the ``compute`` mode's reference numerics (:mod:`qbackend.kernels.reference`) vs the
  exact fp32 compute on the same quantized weight: what the faster arithmetic adds.

The ratio added / format is what the ``compute="auto"`` policy bounds (``qbackend.kernels.compute_policy``):
a mode is allowed for a format when its worst layer's ratio stays below the bound. No timing here.

    .venv/bin/python benchmarks/measure_compute_error.py [--sentences 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from qbackend.demo import sentences as demo_sentences
from qbackend.demo.minilm import load_minilm
from qbackend.formats import quantize
from qbackend.kernels import prepare_weight, reference
from qbackend.kernels.families import FAMILIES
from qbackend.kernels.spec import COMPUTE_MODES

#: the reference numerics of each mode, plus bf16 with the decoded weight rounded too (allowed to kernels)
MODES = (*(m for m in COMPUTE_MODES if m != "fp32"), "bf16 (W rounded)")

FORMATS = {
    "nf4": dict(preset="nf4"),
    "fp4": dict(preset="fp4"),
    "int4-g128": dict(preset="int4"),
    "int4-g64": dict(preset="int4-g64"),
    "int8": dict(preset="int8"),
}


def _sentences(which: str, n: int) -> list[str]:
    return list(getattr(demo_sentences, f"{which.upper()}_SENTENCES"))[:n]


def layer_inputs(n_sentences: int, which: str = "evaluation") -> tuple[dict[str, nn.Linear], dict[str, torch.Tensor]]:
    """MiniLM's linear layers and the real input rows each sees on the demo sentences (padding rows dropped)."""
    mini = load_minilm()
    batch = mini.tokenize(_sentences(which, n_sentences))
    keep = batch["attention_mask"].reshape(-1).bool()
    linears = {n: m for n, m in mini.model.named_modules() if isinstance(m, nn.Linear)}
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, args, _out, n=n: seen.__setitem__(n, args[0].reshape(-1, args[0].shape[-1])))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        mini.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    return linears, {n: x[keep] if x.shape[0] == keep.numel() else x for n, x in seen.items()}


def measure(n_sentences: int, which: str = "evaluation") -> dict[str, dict[str, list[float]]]:
    """format name -> {"format": [...], mode: [...]} relative output errors, one entry per layer."""
    from qbackend.core.config import QuantConfig

    linears, inputs = layer_inputs(n_sentences, which)
    out: dict[str, dict[str, list[float]]] = {}
    for fname, opts in FORMATS.items():
        scheme = QuantConfig.from_options(opts).scheme
        errs: dict[str, list[float]] = {"format": [], **{m: [] for m in MODES}}
        for name, lin in linears.items():
            x = inputs[name].float()
            w = lin.weight.detach().float()
            y_float = x @ w.t()
            denom = float(y_float.norm())
            kw = prepare_weight(quantize(w, scheme, name=name))
            fn = getattr(reference, f"{FAMILIES[scheme.format].kernel}_linear")
            with torch.no_grad():
                y_exact = fn(x, *kw.tensors, None, *kw.statics, "fp32")
                errs["format"].append(float((y_exact - y_float).norm()) / denom)
                w_q = fn(torch.eye(w.shape[1]), *kw.tensors, None, *kw.statics, "fp32").t()
                for mode in MODES:
                    if mode == "bf16 (W rounded)":  # what a library bf16 GEMM on the decoded weight computes
                        y_mode = x.bfloat16().float() @ w_q.bfloat16().float().t()
                    else:
                        y_mode = fn(x, *kw.tensors, None, *kw.statics, mode)
                    errs[mode].append(float((y_mode - y_exact).norm()) / denom)
        out[fname] = errs
    return out


def end_to_end(n_sentences: int, which: str = "evaluation") -> dict[str, dict[str, float]]:
    """format -> {mode: mean embedding cosine vs the float model} with every layer in that compute mode."""
    import copy

    import qbackend
    from qbackend.demo.minilm import pooled_embeddings

    mini = load_minilm()
    batch = mini.tokenize(_sentences(which, n_sentences))
    with torch.no_grad():
        ref_emb = pooled_embeddings(mini.model, batch)
    out: dict[str, dict[str, float]] = {}
    for fname, opts in FORMATS.items():
        out[fname] = {}
        for mode in COMPUTE_MODES:
            model = copy.deepcopy(mini.model)
            qbackend.quantize_(model, {**opts, "compute": mode})
            with torch.no_grad():
                emb = pooled_embeddings(model, batch)
            out[fname][mode] = float(torch.nn.functional.cosine_similarity(emb, ref_emb, dim=-1).mean())
    return out


def table(results: dict[str, dict[str, list[float]]]) -> str:
    modes = list(MODES)
    head = "| format | own output error (median / max) | " + " | ".join(
        f"{m}: added error (median / max) | {m}: added / own (max)" for m in modes
    ) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(modes))]
    for fname, errs in results.items():
        own = torch.tensor(errs["format"])
        cells = [fname, f"{own.median():.2e} / {own.max():.2e}"]
        for m in modes:
            add = torch.tensor(errs[m])
            cells += [f"{add.median():.2e} / {add.max():.2e}", f"{float((add / own).max()):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(results: dict[str, dict[str, list[float]]], e2e: dict[str, dict[str, float]]) -> str:
    """Per format and mode: added / own error (median layer, worst layer, all layers together) and the
    end-to-end embedding cosine."""
    modes = list(MODES)
    lines = ["| format | mode | added / own: median layer | worst layer | all layers (root sum square) "
             "| embedding cosine vs float (fp32 compute -> this mode) |", "|---|---|---:|---:|---:|---|"]  # fmt: skip
    for fname, errs in results.items():
        own = torch.tensor(errs["format"])
        for m in modes:
            add = torch.tensor(errs[m])
            r = add / own
            rss = float(add.square().sum().sqrt() / own.square().sum().sqrt())
            cos = e2e.get(fname, {})
            cell = f"{cos['fp32']:.5f} -> {cos[m]:.5f}" if m in cos else "-"
            lines.append(f"| {fname} | {m} | {float(r.median()):.3f} | {float(r.max()):.3f} | {rss:.3f} | {cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=64, help="demo sentences to run (at most; default 64)")
    p.add_argument("--set", default="evaluation", choices=("evaluation", "calibration", "training"),
                   help="which demo sentence list (default: the 32 held-out evaluation sentences)")
    p.add_argument("--json", help="also write the per-layer errors here")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the whole-model embedding cosines")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    n = len(_sentences(args.set, args.sentences))
    results = measure(n, args.set)
    print(f"MiniLM (all-MiniLM-L6-v2), {n} demo {args.set} sentences, every linear layer; "
          "errors relative to ||x W^T|| of the float layer\n")  # fmt: skip
    print(table(results))
    e2e = {} if args.no_end_to_end else end_to_end(n, args.set)
    print()
    print(ratio_table(results, e2e))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": results, "end_to_end": e2e}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
