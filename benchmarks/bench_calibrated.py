"""GPTQ, AWQ and HQQ vs round to nearest on the real all-MiniLM-L6-v2: embedding cosine on held-out sentences and time.

    python benchmarks/bench_calibrated.py [--threads 2] [--quick] [--json out.json] [--peers-python PY]

Calibration: the demo's calibration and training sentences (``qbackend.demo.sentences``, 495
sentences, ~7.3k tokens), ``qbackend.calibrate(..., hessian=True)``. Evaluation: the 33 held-out
evaluation sentences (disjoint from both). Every linear layer (37) is quantized with
``qbackend.quantize_`` (the ops the compiled model runs). Times: the calibration pass and
``quantize_`` of the whole model, one run each (quantize_ with GPTQ includes the Cholesky
factorisations and the round-to-nearest comparison of every layer).

Peers, where they run on this CPU: ``hqq`` (calibration-free HQQ, int4 groups; its dequantized
weights are put into the float model, so its row measures accuracy only). With ``--peers-python``
(the interpreter of a separate virtual environment holding llm-compressor, GPTQModel, hqq: never the
project's), ``bench_calibrated_peers.py`` runs there in the same invocation, on the same sentences,
and its rows join the table (a peer that does not run shows its error).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

import qbackend  # noqa: E402
from qbackend.demo.minilm import embedding_quality, load_minilm  # noqa: E402
from qbackend.demo.sentences import CALIBRATION_SENTENCES, EVALUATION_SENTENCES, TRAINING_SENTENCES  # noqa: E402

PRESETS = ("nf4", "int4", "int8")
METHODS = (("rtn", None), ("gptq", {"name": "gptq"}), ("gptq act-order", {"name": "gptq", "act_order": True}),
           ("awq", {"name": "awq"}), ("hqq", {"name": "hqq"}))


def _hqq_model(model: torch.nn.Module, group_size: int) -> torch.nn.Module | None:
    """The float model with every linear weight replaced by its HQQ 4-bit (affine, groups) dequantization."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        return None
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.data
            wq, meta = Quantizer.quantize(
                w, nbits=4, channel_wise=True, group_size=group_size, optimize=True, round_zero=False, axis=1,
                device="cpu", compute_dtype=torch.float32,
            )  # fmt: skip
            mod.weight.data = Quantizer.dequantize(wq, meta).reshape(w.shape).float()
    return m


def _peer_rows(python: str, threads: int) -> list[dict]:
    """Run ``bench_calibrated_peers.py`` under ``python`` (its own venv) and return its rows as ours."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        script = Path(__file__).with_name("bench_calibrated_peers.py")
        proc = subprocess.run([python, str(script), "--threads", str(threads), "--json", str(out)],
                              capture_output=True, text=True, cwd=tmp)  # fmt: skip
        if not out.exists():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return [{"format": "peers", "method": python, "error": tail}]
        peers = json.loads(out.read_text())
    rows = []
    for p in peers:
        row = {"format": "int4 g128 asym (peer)", "method": p["peer"], "rtn_kept": "", "versions": p["versions"]}
        row.update({k: p[k] for k in ("cosine_mean", "cosine_min", "quantize_s", "error") if k in p})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_threads_option(parser)
    parser.add_argument("--quick", action="store_true", help="nf4 only, no act-order")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--methods", default=",".join(m for m, _ in METHODS), help="comma-separated methods")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--peers-python", default=None, help="python of a separate venv with the peers")
    parser.add_argument("--peers-threads", type=int, default=None, help="torch threads of the peers (default: ours)")
    args = parser.parse_args()
    _common.apply_threads(args)
    print(_common.header(extra=f"threads {torch.get_num_threads()}"))
    mm = load_minilm()
    sentences = list(CALIBRATION_SENTENCES) + list(TRAINING_SENTENCES)
    batches = [dict(mm.tokenize(sentences[i : i + 32])) for i in range(0, len(sentences), 32)]
    t0 = time.perf_counter()
    cal = qbackend.calibrate(mm.model, batches, hessian=True, progress=False)
    t_cal = time.perf_counter() - t0
    print(f"# calibration: {len(sentences)} sentences, {cal.num_batches} batches, "
          f"{max(s.tokens for s in cal.layers.values())} tokens/layer, {t_cal:.1f} s")  # fmt: skip
    with torch.no_grad():
        ref = mm.embed(EVALUATION_SENTENCES)
    rows = []
    presets = PRESETS[:1] if args.quick else tuple(p for p in args.presets.split(",") if p)
    methods = METHODS[:2] if args.quick else tuple(m for m in METHODS if m[0] in args.methods.split(","))
    for preset in presets:
        for label, method in methods:
            model = copy.deepcopy(mm.model)
            opts = {"preset": preset}
            if method is not None:
                opts.update(method=method) if method["name"] == "hqq" else opts.update(method=method, calibration=cal)
            t0 = time.perf_counter()
            report = qbackend.quantize_(model, opts)
            dt = time.perf_counter() - t0
            with torch.no_grad():
                q = embedding_quality(ref, mm.embed(EVALUATION_SENTENCES, model))
            kept = ""
            if method is not None:
                section = report.sections[method["name"]][0].rows
                kept = str(sum(r.note.startswith("round to nearest kept") for r in section))
            fmt = report.quantized[0].format
            rows.append({"preset": preset, "format": fmt, "method": label, **q, "quantize_s": dt, "rtn_kept": kept})
            print(f"| {fmt} | {label} | {q['cosine_mean']:.5f} | {q['cosine_min']:.5f} | "
                  f"{q['similarity_corr']:.5f} | {dt:.1f} | {kept} |", flush=True)  # fmt: skip
    if not args.quick:
        for gs in (128, 64):
            t0 = time.perf_counter()
            hq = _hqq_model(mm.model, gs)
            dt = time.perf_counter() - t0
            if hq is None:
                print("# hqq is not installed: no HQQ row")
                break
            with torch.no_grad():
                q = embedding_quality(ref, mm.embed(EVALUATION_SENTENCES, hq))
            rows.append({"preset": f"hqq int4 g{gs}", "format": f"int4-affine-g{gs} (HQQ)", "method": "hqq", **q,
                         "quantize_s": dt, "rtn_kept": ""})  # fmt: skip
            print(f"| int4-affine-g{gs} (HQQ, dequantized weights) | hqq (no data) | {q['cosine_mean']:.5f} | "
                  f"{q['cosine_min']:.5f} | {q['similarity_corr']:.5f} | {dt:.1f} |  |", flush=True)  # fmt: skip
    if args.peers_python:
        rows += _peer_rows(args.peers_python, args.peers_threads or torch.get_num_threads())
    print("\n| format | method | cosine mean | cosine min | similarity corr | quantize_ s | layers RTN kept |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['format']} | {r['method']} | did not run: {r['error']} | | | | |")
            continue
        corr = "" if r.get("similarity_corr") is None else f"{r['similarity_corr']:.5f}"
        print(f"| {r['format']} | {r['method']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | "
              f"{corr} | {r['quantize_s']:.1f} | {r['rtn_kept']} |")  # fmt: skip
    print(f"\n{_common.load_line('load average at the end')}")
    if args.json:
        _common.write_json(args.json, {"calibration_s": t_cal, "rows": rows})


if __name__ == "__main__":
    main()
