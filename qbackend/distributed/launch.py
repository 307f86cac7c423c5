"""Which process-group backend and device a rank uses, and starting the group.

>>> rank, world, device = init_distributed()   # under torchrun: NCCL + cuda:LOCAL_RANK, else gloo + CPU

NCCL runs one rank per GPU (it cannot put two ranks on one device), so "auto" picks NCCL only when
the node has at least as many visible GPUs as local ranks; otherwise gloo on the CPU. Asking for
NCCL explicitly where that does not hold raises an error that says how many GPUs are missing.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")


def pick_backend(requested: str = "auto", local_rank: int = 0, local_world: int = 1) -> tuple[str, torch.device]:
    """(backend, device) for the rank ``local_rank`` of ``local_world`` ranks on this node.

    requested: "auto" (NCCL with one GPU per rank when there are enough GPUs, else gloo on the CPU),
        "nccl" or "gloo".
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r} is not one of {', '.join(BACKENDS)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    enough = gpus >= local_world and local_rank < gpus
    if requested == "nccl" and not enough:
        raise RuntimeError(
            f"nccl needs one GPU per rank: {local_world} rank(s) on this node but {gpus} GPU(s) visible "
            "(NCCL cannot put two ranks on one GPU); use backend 'gloo' (CPU) or fewer ranks per node"
        )
    if requested == "nccl" or (requested == "auto" and enough and dist.is_nccl_available()):
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


def init_distributed(backend: str = "auto", timeout: timedelta | None = None) -> tuple[int, int, torch.device]:
    """Start the default process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR/PORT) with :func:`pick_backend`; on CUDA also select the rank's
    GPU. Returns (rank, world size, device)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    name, device = pick_backend(backend, local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"timeout": timeout} if timeout is not None else {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # binds the group to the GPU (object collectives, barriers)
    dist.init_process_group(name, **kwargs)
    return dist.get_rank(), dist.get_world_size(), device
