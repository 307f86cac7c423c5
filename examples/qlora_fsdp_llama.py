"""QLoRA on N processes: a Llama-architecture model with a frozen NF4 base sharded by FSDP2 (or replicated by DDP).

    torchrun --nproc-per-node 2 examples/qlora_fsdp_llama.py [--mode fsdp|ddp] [--steps 12]
             [--hidden 1024 --layers 4 --batch 8 --seq 64] [--save CKPT_DIR] [--json OUT.json]

The model (random weights from a config) is built one block at a time (only one block is ever held
in float), its projections quantized to NF4 (blocks of 64, nested constants) with LoRA adapters on
them; ``shard_qlora`` then puts each block under ``fully_shard`` so each rank stores ~1/N of the
quantized base. Every rank trains on its 1/N of each global batch (a toy task: continue counting
sequences mod the vocabulary). Rank 0 prints, per rank: quantized-base bytes held, RSS before
training (after sharding; memory freed by the build handed back with ``malloc_trim``) and its peak
during training (sampled every millisecond), and the median step time.
Memory: by default glibc keeps blocks freed during a step (FSDP2's all-gather buffers, kernel
temporaries) in its heap for reuse, so the peak RSS counts them although they are free; with 2+ ranks
FSDP2's all-gather path (there is none on 1 rank) frees and reallocates more such blocks, and the
peak RSS per rank came out higher than on 1 rank although the live heap was lower (``--heap`` shows
glibc's figures). ``--mmap-threshold 1048576`` hands blocks of 1 MiB and more back to the OS at
each free: the peak RSS then follows live memory (benchmarks/RESULTS.md has both).
``--save`` writes a ``torch.distributed.checkpoint`` that reloads on any number of ranks
(``qbackend.distributed.load_checkpoint``) or into ``qbackend.load`` (``consolidate``).
CPU runs use gloo, GPU runs NCCL (one GPU per rank; ``--backend`` to choose).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import threading
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM

from qbackend.distributed import quantized_nbytes, replicate_qlora, save_checkpoint, shard_qlora
from qbackend.distributed.launch import init_distributed
from qbackend.qat import add_lora, lora_parameters, quantize_base

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="auto: NCCL with one GPU per rank where there are enough GPUs, else gloo on the CPU")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps not timed")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="global batch (split over the ranks)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank-lora", type=int, default=8, dest="r")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: torch's choice)")
    p.add_argument("--save", default=None, help="directory for a distributed checkpoint after training")
    p.add_argument("--json", default=None, help="rank 0 writes the per-rank figures here")
    p.add_argument("--no-reshard", action="store_true", help="FSDP2: keep each block unsharded after its forward")
    p.add_argument("--heap", action="store_true", help="also record glibc's heap figures at the RSS peak")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="glibc: serve allocations from BYTES up with mmap and return them to the OS when freed "
                        "(e.g. 1048576; same as MALLOC_MMAP_THRESHOLD_): the peak RSS then follows live memory")
    return p.parse_args()


def release_freed_memory() -> None:
    """Give memory freed by the build back to the OS (glibc keeps it otherwise), so RSS shows what is held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then also counts freed heap
        pass


def set_mmap_threshold(nbytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD (fixed: no longer raised after each large free). By default glibc raises
    it up to 32 MiB as large blocks are freed, so the next ones come from the heap and stay there
    after their free: RSS then counts freed all-gather buffers and kernel temporaries."""
    try:
        if not ctypes.CDLL("libc.so.6").mallopt(-3, nbytes):  # -3: M_MMAP_THRESHOLD
            raise SystemExit(f"--mmap-threshold {nbytes}: refused by glibc (at most 32 MiB on 64-bit)")
    except (OSError, AttributeError):
        raise SystemExit("--mmap-threshold needs glibc") from None


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def heap_bytes() -> dict[str, int] | None:
    """glibc's view of the heap: bytes in use (small chunks + mmapped) and bytes free but kept."""
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    m = f()
    return {"in_use": m.uordblks + m.hblkhd, "mmapped": m.hblkhd, "free_kept": m.fordblks}


class PeakRSS:
    """Samples this process's RSS in a thread while running (``peak``); with ``heap=True`` also glibc's
    heap figures at the sample where RSS peaked (``heap_at_peak``) and the most heap in use in any
    sample (``heap_in_use_max``: live allocations, without what malloc keeps after a free)."""

    def __init__(self, heap: bool = False) -> None:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self.heap, self.heap_at_peak = heap, heap_bytes() if heap else None
        self.heap_in_use_max = self.heap_at_peak["in_use"] if self.heap_at_peak else None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = rss_bytes()
            heap = heap_bytes() if self.heap else None
            if heap:
                self.heap_in_use_max = max(self.heap_in_use_max, heap["in_use"])
            if now > self.peak:
                self.peak, self.heap_at_peak = now, heap
            time.sleep(1e-3)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def build(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The QLoRA model, quantized block by block: same weights on every rank (one seed per block)."""
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq,
                      tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    for i, part in enumerate([*model.model.layers, model.model.embed_tokens, model.model.norm, model.lm_head]):
        part.to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(1000 + i)
        with torch.no_grad():
            for p in part.parameters():
                p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 0.02, generator=g)  # norms: 1; matrices: N(0, 0.02)
        if i < args.layers:
            quantize_base(part)  # the block's projections -> NF4; its float weights are freed now
    # the rotary embedding's buffer is computed, not stored: build it again off the meta device
    with device:
        model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    torch.manual_seed(0)  # the same adapters on every rank
    add_lora(model, r=args.r, alpha=2 * args.r, target_modules=TARGETS)
    return model


def toy_batch(g: torch.Generator, args: argparse.Namespace) -> torch.Tensor:
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=g)
    stride = torch.randint(1, 4, (args.batch, 1), generator=g)
    return (start + stride * torch.arange(args.seq)) % args.vocab


def main() -> None:
    args = parse_args()
    if args.mmap_threshold is not None:
        set_mmap_threshold(args.mmap_threshold)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed(args.backend)
    cuda = device.type == "cuda"
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} ranks")
    rss_start = rss_bytes()
    model = build(args, device)
    if args.mode == "fsdp":
        shard_qlora(model, init_device_mesh(device.type, (world,)), reshard_after_forward=not args.no_reshard)
        step_model = model
    else:
        model = replicate_qlora(model)
        step_model = model.module
    held, whole = quantized_nbytes(step_model) if args.mode == "fsdp" else (0, 0)
    if args.mode == "ddp":
        held = whole = sum(b.numel() * b.element_size() for n, b in step_model.named_buffers() if ".base." in n)
    opt = torch.optim.AdamW(lora_parameters(step_model), lr=args.lr)
    g = torch.Generator().manual_seed(1)
    times, losses = [], []
    release_freed_memory()
    rss_before = rss_bytes()
    heap_before = heap_bytes() if args.heap else None
    with PeakRSS(heap=args.heap) as peak:
        for step in range(args.steps):
            ids = toy_batch(g, args).chunk(world)[rank].to(device)
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / world)
            if rank == 0 and (step == 0 or (step + 1) % 4 == 0 or step + 1 == args.steps):
                print(f"step {step + 1:>3}  loss {losses[-1]:.4f}  {times[-1]:.2f} s", flush=True)
    mine = {
        "rank": rank, "world": world, "mode": args.mode, "quantized_base_bytes_held": held,
        "quantized_base_bytes_whole": whole, "rss_start_mb": rss_start / 2**20,
        "rss_before_train_mb": rss_before / 2**20,
        "rss_peak_train_mb": peak.peak / 2**20, "step_s_median": statistics.median(times[args.warmup:] or times),
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "heap_before_train": heap_before, "heap_at_peak": peak.heap_at_peak, "heap_in_use_max": peak.heap_in_use_max,
    }  # fmt: skip
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if args.save:
        save_checkpoint(model, args.save)
    if rank == 0:
        print(f"\n{args.mode} on {world} rank(s), hidden {args.hidden}, {args.layers} blocks, global batch "
              f"{args.batch}x{args.seq}, threads/rank {torch.get_num_threads()}; "
              f"losses {losses[0]:.3f} -> {losses[-1]:.3f}")  # fmt: skip
        print("| rank | quantized base held (MB) | of whole (MB) | RSS before training (MB) | peak RSS training (MB) "
              "| median step (s) |\n|---:|---:|---:|---:|---:|---:|")  # fmt: skip
        for r in everyone:
            print(f"| {r['rank']} | {r['quantized_base_bytes_held'] / 2**20:.2f} | "
                  f"{r['quantized_base_bytes_whole'] / 2**20:.2f} | {r['rss_before_train_mb']:.0f} | "
                  f"{r['rss_peak_train_mb']:.0f} | {r['step_s_median']:.3f} |")  # fmt: skip
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "losses": losses, "ranks": everyone}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
