"""Loading a float16 Hugging Face checkpoint to NF4 on the CPU: peak memory and time.

The script writes a synthetic Llama-architecture checkpoint (random fp16 weights, 2 GB shards with an
index, as transformers writes them) of about ``--params`` parameters into a temporary directory,
loads it to NF4 three ways, each in its own process (a clean RSS), and deletes the directory:

* ``qbackend.from_pretrained``: quantized while the shards are read, tensor by tensor;
* ``transformers + quantize_``: ``AutoModelForCausalLM.from_pretrained(dtype=float16)`` then
  ``qbackend.quantize_(model, "nf4")``;
* ``transformers + bnb``: ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  nf4, double quant))`` on the CPU (skipped where bitsandbytes is missing or refuses to run).

Reported per method (medians over ``--rounds`` interleaved rounds): peak RSS over the process's
baseline after its imports (the kernel's high-water mark, reset before loading), the final model's
tensor bytes, and the wall time. The issue's bound for qbackend: peak <= 1.3 x the quantized model +
the largest single tensor of the checkpoint (its column "bound").

    python benchmarks/bench_from_pretrained.py [--params 3e9] [--rounds 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

METHODS = ("qbackend.from_pretrained", "transformers + quantize_", "transformers + bnb")
VOCAB = 32000
SHARD_BYTES = 2 * 10**9


# ---- the synthetic checkpoint -----------------------------------------------------------------------


def llama_shape(params: float, vocab: int = VOCAB) -> dict[str, int]:
    """A Llama config of about ``params`` parameters (3e9: hidden 3072, 28 layers, as Llama-3.2-3B)."""
    for hidden, inter, heads, kv in ((3072, 8192, 24, 8), (2048, 5632, 16, 4), (1024, 2816, 16, 4), (512, 1408, 8, 2)):
        head = hidden // heads
        per_layer = 2 * hidden * hidden + 2 * hidden * kv * head + 3 * hidden * inter + 2 * hidden
        layers = round((params - 2 * vocab * hidden) / per_layer)
        if layers >= 4 or hidden == 512:
            return {"hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
                    "num_key_value_heads": kv, "num_hidden_layers": max(layers, 1), "vocab_size": vocab}  # fmt: skip
    raise AssertionError("unreachable")


def write_checkpoint(directory: Path, shape: dict[str, int], seed: int = 0) -> dict[str, int]:
    """Random fp16 weights of a Llama of ``shape`` in 2 GB shards + index + config.json; returns sizes."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=False, dtype="float16")
    cfg.save_pretrained(directory)
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = params = largest = 0
    for name, s in names.items():
        t = (torch.randn(s, generator=gen) * 0.02).half() if len(s) == 2 else torch.ones(s, dtype=torch.float16)
        n = t.numel() * 2
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size, total, params, largest = size + n, total + n, params + t.numel(), max(largest, n)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        shard.clear()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"params": params, "file_bytes": total, "largest_tensor": largest, "shards": len(shards)}


# ---- one load, in a child process --------------------------------------------------------------------


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS
        f.write("5")


def child(method: str, directory: str) -> dict:
    import torch
    import transformers

    import qbackend

    torch.manual_seed(0)
    _warm_up(method)
    gc.collect()
    base = _rss()
    _reset_peak()
    t0 = time.perf_counter()
    if method == "qbackend.from_pretrained":
        model = qbackend.from_pretrained(directory, "nf4", progress=False)
    elif method == "transformers + quantize_":
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float16)
        qbackend.quantize_(model, "nf4")
    else:
        bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True,
                                                     bnb_4bit_compute_dtype=torch.float16)  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=bnb_config,
                                                                  device_map="cpu")  # fmt: skip
    seconds = time.perf_counter() - t0
    peak, final = _hwm() - base, _rss() - base  # before any forward: a first call may build kernel caches
    gc.collect()
    seen, model_bytes = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            model_bytes += t.numel() * t.element_size()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    return {"method": method, "seconds": seconds, "peak_rss": peak, "final_rss": final,
            "model_bytes": model_bytes, "finite": bool(torch.isfinite(logits).all())}  # fmt: skip


def _warm_up(method: str) -> None:
    """Import what every method loads on first use (code, not data), so the baseline holds it for all."""
    import torch
    import transformers

    import qbackend
    import qbackend.pretrained  # noqa: F401

    tiny = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(tiny)  # the model code's lazy imports
    layer = torch.nn.Sequential(torch.nn.Linear(128, 128))
    qbackend.quantize_(layer, {"format": "nf4", "min_params": 0})
    with torch.no_grad():
        layer(torch.randn(2, 128))
    if method == "transformers + bnb":
        import bitsandbytes  # noqa: F401


def run_child(method: str, directory: Path, timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--child", method, str(directory)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout:.0f} s"}
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1][:200]
        return {"method": method, "error": f"exit {r.returncode}: {last}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the table ------------------------------------------------------------------------------------------


def table(rows: list[dict], sizes: dict[str, int]) -> str:
    gib = 2**30
    lines = ["| method | peak RSS (GiB) | final model (GiB) | peak / (1.3 x model + largest tensor) | time (s) |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | - | - | - | {r['error']} |")
            continue
        bound = 1.3 * r["model_bytes"] + sizes["largest_tensor"]
        lines.append(f"| {r['method']} | {r['peak_rss'] / gib:.2f} | {r['model_bytes'] / gib:.2f} | "
                     f"{r['peak_rss'] / bound:.2f} | {r['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=3e9, help="parameters of the synthetic Llama (default 3e9)")
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary size (default {VOCAB})")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per method (medians reported)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per load")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    print(_common.header(extra=f"--params {args.params:.3g}, --rounds {args.rounds}"))
    root = Path(tempfile.mkdtemp(prefix="qb-bench-pretrained-", dir=args.dir))
    try:
        shape = llama_shape(args.params, args.vocab)
        t0 = time.perf_counter()
        sizes = write_checkpoint(root, shape)
        print(f"# checkpoint: {sizes['params'] / 1e9:.2f} B params, {sizes['file_bytes'] / 2**30:.2f} GiB fp16 in "
              f"{sizes['shards']} shards (largest tensor {sizes['largest_tensor'] / 2**20:.0f} MiB), "
              f"written in {time.perf_counter() - t0:.0f} s; {shape}")  # fmt: skip
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(args.rounds):
            for m in methods[r % len(methods) :] + methods[: r % len(methods)]:  # rotate the order each round
                runs[m].append(run_child(m, root, args.timeout))
        rows = [_median_row(m, runs[m]) for m in methods]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(rows, sizes))
    print("# " + _common.load_line("load average at the end"))
    if args.json:
        _common.write_json(args.json, {"sizes": sizes, "shape": shape, "rows": rows}, announce=False)


def _median_row(method: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key in ("seconds", "peak_rss", "final_rss"):
        out[key] = statistics.median(r[key] for r in ok)
    out["rounds"] = len(ok)
    return out


if __name__ == "__main__":
    main()
