"""Memory of one training step: QLoRA (NF4 nested base + LoRA) vs the float model.

Each configuration runs in its own process (clean RSS) on the same Llama-architecture model
(random init from a config):

* ``float-full``: fp32, every parameter trained (AdamW);
* ``float-lora``: fp32 frozen base + LoRA adapters (r=8 on q/k/v/o projections);
* ``qlora``: the same adapters over the NF4 (blocks of 64, nested constants) base of
  ``qbackend.qat.quantize_base`` — float weights freed, the base runs the quantized op.

Reported per configuration: bytes of the model state, bytes saved for backward during the forward
(split into model weights vs activations; a float base saves its weights, which are alive anyway),
gradient + optimizer-state bytes, and the process RSS (over the interpreter's baseline) before a
step and its peak during steps (sampled every millisecond). ``--compile`` trains
through ``torch.compile(backend="qbackend")`` instead of eagerly.

    python benchmarks/bench_qlora_memory.py [--hidden 512 --layers 4 --batch 4 --seq 128] [--compile]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

import _common

CONFIGS = ("float-full", "float-lora", "qlora")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process RSS in a thread; ``peak`` is the maximum seen while running."""

    def __init__(self, period: float = 1e-3) -> None:
        self.period, self.peak, self._stop = period, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def run_one(config: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbackend.qat import add_lora, quantize_base

    torch.manual_seed(0)
    baseline = rss_bytes()
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if config != "float-full":
        add_lora(model, r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    if config == "qlora":
        quantize_base(model)  # lm_head stays float (QLoRA convention)
    gc.collect()
    params = list(p for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-4)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    weights = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    step_model = torch.compile(model, backend="qbackend") if args.compile else model
    g = torch.Generator().manual_seed(1)

    def step(record: dict | None = None) -> None:
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        seen: set[tuple[int, int]] = set()

        def pack(t):
            if record is not None:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                if key not in seen:  # count each storage once
                    seen.add(key)
                    kind = "weights" if t.untyped_storage().data_ptr() in weights else "activations"
                    record[kind] = record.get(kind, 0) + t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()  # warm-up (compile, optimizer state)
    saved: dict[str, int] = {}
    before = rss_bytes()
    with PeakRSS() as peak:
        step(saved if not args.compile else None)
        for _ in range(args.steps - 1):
            step()
    grads_opt = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    grads_opt += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "config": config,
        "params_total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "state_MB": state_bytes / 1e6,
        "saved_weights_MB": saved.get("weights", 0) / 1e6,
        "saved_activations_MB": saved.get("activations", 0) / 1e6,
        "grads_opt_MB": grads_opt / 1e6,
        "rss_before_step_MB": (before - baseline) / 1e6,
        "rss_peak_step_MB": (peak.peak - baseline) / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--only", choices=CONFIGS, help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return
    mode = "compiled (qbackend)" if args.compile else "eager"
    print(_common.header(extra=f"Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, "
                               f"batch {args.batch} x seq {args.seq}, {mode}"))  # fmt: skip
    rows = []
    for config in CONFIGS:
        cmd = [sys.executable, "-X", "faulthandler", __file__, "--only", config, *sys.argv[1:]]
        # A fixed glibc mmap threshold: freed large tensors (the float weights quantize_base drops) go
        # back to the OS instead of raising the threshold and lingering in the heap; RSS = live memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    cols = ["config", "trainable", "state_MB", "saved_weights_MB", "saved_activations_MB", "grads_opt_MB",
            "rss_before_step_MB", "rss_peak_step_MB"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
