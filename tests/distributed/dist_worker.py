"""One rank of the distributed tests (run by conftest's ``run_ranks``, or by hand under torchrun).

    python tests/distributed/dist_worker.py SCENARIO OUTDIR     # with RANK, WORLD_SIZE, MASTER_ADDR/PORT set

Scenarios: ``all`` (FSDP2 QLoRA vs one process, checkpoint save 2 ranks / load from 1 rank, DDP,
tensor parallel of quantized and LoRA layers, TP checkpoints, rows that do not divide the world
size), ``compile`` (FSDP2 QLoRA under
torch.compile(backend="qbackend")) and ``kill_mid_save`` (rank 1 is SIGKILLed while it writes a
checkpoint). Each rank writes
``OUTDIR/result-<rank>.pt``; the tests assert on those results.

QB_DIST_BACKEND selects the process group: "gloo" (default; every rank on the CPU) or "nccl" (rank
i on cuda:i; needs a GPU per rank). Models are built on the CPU, then moved to the rank's device.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module
from transformers import LlamaConfig, LlamaForCausalLM

from qbackend.distributed import (
    CheckpointLayoutError,
    QuantizedColwiseParallel,
    QuantizedRowwiseParallel,
    ShardingError,
    from_row_layout,
    llama_tp_plan,
    load_checkpoint,
    quantized_nbytes,
    replicate_qlora,
    save_checkpoint,
    shard_qlora,
    to_row_layout,
)
from qbackend.distributed.launch import init_distributed
from qbackend.formats import Scheme
from qbackend.kernels import compute_policy
from qbackend.qat import add_lora, lora_parameters, quantize_base

VOCAB = 96
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEVICE = torch.device("cpu")  # the rank's device, set by main()


def on_device(model):
    return model.to(DEVICE)


def mesh(world: int):
    return init_device_mesh(DEVICE.type, (world,))


def llama(hidden: int = 128, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg)


def qlora_model(seed: int = 0, scheme: Scheme | None = None) -> LlamaForCausalLM:
    """Tiny Llama, LoRA on every projection, NF4 (nested, blocks of 64) base; lm_head stays float."""
    m = llama(seed=seed)
    add_lora(m, r=4, alpha=8, target_modules=TARGETS)
    quantize_base(m, **({"scheme": scheme} if scheme else {}))
    return m


def random_adapters(model, seed: int = 0):
    """Non-zero adapters (B starts at zero), so that they change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def quantized_model(scheme: Scheme | None = None) -> LlamaForCausalLM:
    m = llama().requires_grad_(False)
    quantize_base(m, **({"scheme": scheme} if scheme else {}))
    return m.eval()


def batches(steps: int, batch: int = 8, length: int = 16) -> list[torch.Tensor]:
    """Arithmetic sequences mod VOCAB (a task the adapters can learn)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        start = torch.randint(0, VOCAB, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        out.append((start + stride * torch.arange(length)) % VOCAB)
    return out


def probe() -> torch.Tensor:
    return batches(1, batch=2)[0]


def adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(lora_parameters(model), lr=1e-2)


def train(model, data, rank: int = 0, world: int = 1, step_model=None, opt=None) -> list[float]:
    """AdamW on the adapters; each rank takes its slice of every batch; returns the global mean losses."""
    opt = opt or adamw(step_model or model)
    losses = []
    for ids in data:
        part = ids.chunk(world)[rank].to(DEVICE)
        loss = model(input_ids=part, labels=part).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return full(model(input_ids=probe().to(DEVICE)).logits).detach().cpu()


def fsdp_qlora(res: dict, rank: int, world: int, steps: int, out: Path, compile_: bool = False) -> None:
    data = batches(steps)
    ref = on_device(qlora_model())
    res["ref_losses"] = train(ref, data)
    init = qlora_model()
    before = {n: t for n, t in init.named_buffers() if ".base." in n}
    model = on_device(qlora_model())
    shard_qlora(model, mesh(world))
    q = {n: p for n, p in model.named_parameters() if ".base." in n and not n.endswith("bias")}
    res["quantized_param_placements"] = sorted({str(p.placements) for p in q.values() if isinstance(p, DTensor)})
    res["quantized_not_dtensor"] = sorted(n for n, p in q.items() if not isinstance(p, DTensor))
    res["quantized_nbytes"] = quantized_nbytes(model)
    t0 = time.perf_counter()
    runner = torch.compile(model, backend="qbackend") if compile_ else model
    res["losses"] = train(runner, data, rank, world, step_model=model)
    res["train_s"] = time.perf_counter() - t0
    # only adapters train: the quantized base still holds exactly its initial bytes
    gathered = copy.deepcopy(ref)  # same structure, flat layers; overwrite with the gathered base
    to_row_layout(gathered)
    with torch.no_grad():
        for n, p in model.named_parameters():
            gathered.get_parameter(n).copy_(full(p))
    from_row_layout(gathered)
    after = {n: t for n, t in gathered.named_buffers() if ".base." in n}
    same = before.keys() == after.keys()
    res["base_unchanged"] = same and all(torch.equal(before[n], after[n].cpu()) for n in before)
    res["adapter_max_abs_diff"] = max(
        (full(p) - ref.get_parameter(n)).abs().max().item() for n, p in model.named_parameters() if "lora_" in n
    )
    res["adapters_moved"] = any(
        (full(p).cpu() != init.get_parameter(n)).any().item() for n, p in model.named_parameters() if "lora_B" in n
    )
    if compile_:
        return
    res["ref_logits"] = logits(ref)
    res["fsdp_logits"] = logits(model)
    save_checkpoint(model, out / "ckpt-2ranks")  # the test loads it in one process
    fresh = shard_qlora(on_device(qlora_model(seed=5)), mesh(world))
    load_checkpoint(fresh, out / "ckpt-1rank")  # saved by the test in one process
    res["loaded_from_1rank_logits"] = logits(fresh)
    # resume: 10 steps, save model + optimizer, load into a fresh sharded model, 10 more steps
    first = shard_qlora(on_device(qlora_model()), mesh(world))
    opt = adamw(first)
    train(first, data[:10], rank, world, opt=opt)
    save_checkpoint(first, out / "ckpt-step10", optimizer=opt)
    second = shard_qlora(on_device(qlora_model(seed=9)), mesh(world))
    opt2 = adamw(second)
    load_checkpoint(second, out / "ckpt-step10", optimizer=opt2)
    res["resumed_losses"] = train(second, data[10:], rank, world, opt=opt2)


def fsdp_formats_and_mixed_precision(res: dict, rank: int, world: int, steps: int) -> None:
    """int8 / int4 bases under FSDP2, and an NF4 base under a bf16 MixedPrecisionPolicy."""
    data = batches(steps)
    for label, scheme in (("int8", Scheme("int", 8, granularity="channel")),
                          ("int4", Scheme("int", 4, granularity="block", blocksize=32))):  # fmt: skip
        res[f"fsdp_{label}_ref"] = train(on_device(qlora_model(scheme=scheme)), data)
        sharded = shard_qlora(on_device(qlora_model(scheme=scheme)), mesh(world))
        res[f"fsdp_{label}_losses"] = train(sharded, data, rank, world)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard_qlora(on_device(qlora_model()), mesh(world), mp_policy=policy)
    seen = {}

    def record(layer, args):
        names = [n for n in layer._arg_names if n is not None]
        seen.update({n: str(t.dtype) for n, t in zip(names, (t for t in layer.kernel_tensors() if t is not None),
                                                     strict=True)}, x=str(args[0].dtype))  # fmt: skip

    model.get_submodule("model.layers.0.self_attn.q_proj.base").register_forward_pre_hook(record)
    res["fsdp_bf16_losses"] = train(model, data, rank, world)
    res["fsdp_bf16_dtypes_seen"] = seen


def ddp_qlora(res: dict, rank: int, world: int, steps: int, out: Path) -> None:
    data = batches(steps)
    model = replicate_qlora(on_device(qlora_model()), **({"device_ids": [DEVICE]} if DEVICE.type == "cuda" else {}))
    res["ddp_losses"] = train(model, data, rank, world, step_model=model.module)
    save_checkpoint(model, out / "ckpt-ddp")  # flat layers go to the row layout in place; DDP keeps working
    res["ddp_logits"] = logits(model.module)
    res["ddp_losses_after_save"] = train(model, data[:2], rank, world, step_model=model.module)


def tensor_parallel(res: dict, world: int) -> None:
    for label, scheme in (("nf4", None), ("int8", Scheme("int", 8, granularity="channel")),
                          ("int4", Scheme("int", 4, granularity="block", blocksize=32))):  # fmt: skip
        ref = on_device(quantized_model(scheme))
        model = copy.deepcopy(ref)
        to_row_layout(model)
        parallelize_module(model, mesh(world), llama_tp_plan(model))
        q = model.get_submodule("model.layers.0.self_attn.q_proj")
        o = model.get_submodule("model.layers.0.self_attn.o_proj")
        res[f"tp_{label}_codes_local"] = (tuple(q.codes.to_local().shape), tuple(o.codes.to_local().shape))
        res[f"tp_{label}_placements"] = (str(q.codes.placements), str(o.codes.placements))
        res[f"tp_{label}_ref"] = logits(ref)
        res[f"tp_{label}_out"] = logits(model)
    # an MLP with biases: the column-wise bias is sharded, the row-wise one added once after the reduction
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))
    mlp.requires_grad_(False)
    quantize_base(mlp)
    on_device(mlp)
    x = torch.randn(3, 128).to(DEVICE)
    res["tp_bias_ref"] = mlp(x).cpu()
    to_row_layout(mlp)
    parallelize_module(mlp, mesh(world), {"0": QuantizedColwiseParallel(), "2": QuantizedRowwiseParallel()})
    res["tp_bias_out"] = full(mlp(x)).cpu()
    # 64 input columns over 2 ranks: 32 each, half a block of 64
    small = on_device(llama(hidden=64).requires_grad_(False))
    quantize_base(small)
    to_row_layout(small)
    try:
        parallelize_module(small, mesh(world), llama_tp_plan(small))
        res["tp_split_error"] = None
    except ShardingError as e:
        res["tp_split_error"] = str(e)


def tensor_parallel_lora(res: dict, world: int, out: Path) -> None:
    """The QLoRA model (saved by the parent in one process) under the Llama TP plan; its TP checkpoint."""
    model = on_device(qlora_model(seed=5))
    load_checkpoint(model, out / "ckpt-1rank")  # every rank loads the whole model, then splits it
    parallelize_module(model, mesh(world), llama_tp_plan(model))
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    o = model.get_submodule("model.layers.0.mlp.down_proj")
    res["tp_lora_placements"] = {n: str(p.placements) for n, p in (("q.A", q.lora_A), ("q.B", q.lora_B),
                                 ("q.codes", q.base.codes), ("down.A", o.lora_A), ("down.B", o.lora_B),
                                 ("down.codes", o.base.codes))}  # fmt: skip
    res["tp_lora_local_shapes"] = {n: tuple(p.to_local().shape) for n, p in (("q.B", q.lora_B), ("down.A", o.lora_A))}
    res["tp_lora_logits"] = logits(model)
    ids = probe().to(DEVICE)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    res["tp_lora_loss"] = loss.item()
    res["tp_lora_grads"] = {n: full(p.grad).cpu() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    save_checkpoint(model, out / "ckpt-tp")  # the test loads it in one process and into qbackend.load
    # TP checkpoint -> FSDP2 on the same ranks: load into the whole model first (its nested layers are
    # decoded like the TP ones), then shard
    fsdp = on_device(qlora_model(seed=8))
    load_checkpoint(fsdp, out / "ckpt-tp")
    shard_qlora(fsdp, mesh(world))
    res["fsdp_from_tp_logits"] = logits(fsdp)
    # ... and into a model already sharded: refused, naming the layer
    sharded = shard_qlora(on_device(qlora_model(seed=8)), mesh(world))
    try:
        load_checkpoint(sharded, out / "ckpt-tp")
        res["tp_into_sharded_error"] = None
    except CheckpointLayoutError as e:
        res["tp_into_sharded_error"] = str(e)


def kill_mid_save(res: dict, rank: int, world: int, out: Path) -> None:
    """A good checkpoint, then a second save during which rank 1 is SIGKILLed after writing its data file."""
    good = shard_qlora(on_device(random_adapters(qlora_model(seed=1), seed=1)), mesh(world))
    save_checkpoint(good, out / "ck")
    res["good_logits"] = logits(good)
    newer = shard_qlora(on_device(random_adapters(qlora_model(seed=2), seed=2)), mesh(world))
    if rank == 1:
        real_fsync = os.fsync

        def die(fd: int) -> None:  # DCP syncs each data file once written: die right there
            real_fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)

        os.fsync = die
    t0 = time.perf_counter()
    try:
        save_checkpoint(newer, out / "ck")
        res["save_error"] = None
    except Exception as e:  # noqa: BLE001 - the test asserts its class and message
        res["save_error"] = (type(e).__name__, str(e))
    res["save_failed_after_s"] = time.perf_counter() - t0


def odd_rows_mlp() -> torch.nn.Module:
    """LoRA MLP whose second layer has 65 rows: they do not divide over 2 ranks."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 65))
    add_lora(m, r=4, alpha=8, target_modules=("0", "2"))
    quantize_base(m)
    return random_adapters(m, seed=4)


def uneven_rows(res: dict, rank: int, world: int, steps: int) -> None:
    """Refused by default; with allow_uneven_rows FSDP2 pads with whole rows and still matches one process."""
    try:
        shard_qlora(on_device(odd_rows_mlp()), mesh(world), blocks=[])
        res["uneven_error"] = None
    except ShardingError as e:
        res["uneven_error"] = str(e)
    x = torch.randn(steps, 8, 128, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run(model, part: slice) -> list[float]:
        opt, losses = adamw(model), []
        for xs in x:
            loss = model(xs[part]).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total = loss.detach().clone()
            if world > 1:
                dist.all_reduce(total)
            losses.append(total.item() / world)
        return losses

    res["uneven_ref_losses"] = run(on_device(odd_rows_mlp()), slice(None))
    model = shard_qlora(on_device(odd_rows_mlp()), mesh(world), blocks=[], allow_uneven_rows=True)
    res["uneven_nbytes"] = quantized_nbytes(model)
    per = 8 // world
    res["uneven_losses"] = run(model, slice(rank * per, (rank + 1) * per))


def main() -> None:
    # As in the in-process tests (tests/conftest.py): compute="auto" resolves to exact fp32 in the ranks,
    # so they and the parent process compare the same arithmetic. (Here, not at import: the parent
    # process imports this module for its helpers.)
    global DEVICE
    compute_policy.AUTO_MODES = {f: () for f in compute_policy.AUTO_MODES}
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    # a rank that waits on a dead one fails after 60 s instead of torch's default 30 min
    timeout = timedelta(seconds=60) if scenario == "kill_mid_save" else None
    rank, world, DEVICE = init_distributed(os.environ.get("QB_DIST_BACKEND", "gloo"), timeout=timeout)
    res: dict = {"rank": rank, "world": world, "backend": dist.get_backend(), "device": str(DEVICE)}
    try:
        if scenario == "all":
            fsdp_qlora(res, rank, world, steps=20, out=out)
            fsdp_formats_and_mixed_precision(res, rank, world, steps=5)
            ddp_qlora(res, rank, world, steps=20, out=out)
            tensor_parallel(res, world)
            tensor_parallel_lora(res, world, out)
            uneven_rows(res, rank, world, steps=5)
        elif scenario == "compile":
            fsdp_qlora(res, rank, world, steps=int(os.environ.get("QB_STEPS", "20")), out=out, compile_=True)
        elif scenario == "kill_mid_save":
            kill_mid_save(res, rank, world, out)
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    finally:
        torch.save(res, out / f"result-{rank}.pt")
        if scenario != "kill_mid_save":  # a group with a dead member cannot be torn down cleanly
            # both ranks reach the teardown together: a rank still in gloo's teardown while its peer has
            # already exited was seen to abort ("terminate called without an active exception")
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
