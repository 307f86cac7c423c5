"""QLoRA proof: fine-tune a small Llama-architecture model with a frozen NF4 base through the backend.

A tiny ``LlamaForCausalLM`` (random init from a config) gets LoRA adapters on its attention and
MLP projections (peft by default, or ``--adapters ours``), its frozen linear layers are stored in NF4
with nested constants (``quantize_base``: the float weights are freed), and it is trained with
``torch.compile(backend="qbackend")`` on a toy task: continue a counting sequence
``a, a+k, a+2k, ... (mod V)``. The same training with the dequantized float base (fp32
``nn.Linear`` holding exactly the NF4 values) runs alongside: the losses agree step for step.

    python examples/qlora_llama.py [--steps 40] [--adapters peft|ours]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qbackend.qat import add_lora, dequantize_base, lora_parameters, quantize_base

VOCAB = 96
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--adapters", choices=["peft", "ours"], default="peft")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def toy_batch(g: torch.Generator, batch: int = 16, length: int = 24) -> torch.Tensor:
    """Arithmetic sequences mod VOCAB with a random start and stride 1..3."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    return (start + stride * torch.arange(length)) % VOCAB


def build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if args.adapters == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS)))
    else:
        add_lora(model, r=8, alpha=16, target_modules=TARGETS)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main() -> None:
    args = parse_args()
    model = build(args)
    float_bytes = weight_bytes(model)
    names = quantize_base(model, exclude=())  # every frozen linear, lm_head included
    trainable = sum(p.numel() for p in lora_parameters(model))
    print(f"NF4 (nested, b64) base: {len(names)} linear layers; model state {float_bytes / 1e6:.2f} MB -> "
          f"{weight_bytes(model) / 1e6:.2f} MB; {trainable} trainable adapter params")  # fmt: skip

    reference = copy.deepcopy(model)
    dequantize_base(reference)  # fp32 nn.Linear with exactly the NF4 values
    cmodel = torch.compile(model, backend="qbackend")
    opt = torch.optim.AdamW(lora_parameters(model), lr=args.lr)
    opt_ref = torch.optim.AdamW(lora_parameters(reference), lr=args.lr)

    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    worst = 0.0
    print(f"{'step':>4} {'QLoRA (compiled, NF4 base)':>27} {'float base':>11} {'|diff|':>9}")
    for step in range(1, args.steps + 1):
        ids = toy_batch(g)
        loss = cmodel(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_ref = reference(input_ids=ids, labels=ids).loss
        loss_ref.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        diff = abs(loss.item() - loss_ref.item())
        worst = max(worst, diff / max(abs(loss_ref.item()), 1e-6))
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"{step:>4} {loss.item():>27.5f} {loss_ref.item():>11.5f} {diff:>9.2e}  ({time.time() - t0:.0f}s)",
                  flush=True)  # fmt: skip
    print(f"max relative loss difference over {args.steps} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
