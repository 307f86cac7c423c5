"""Bytes at many addresses in one launch: the device side of the per-call weight fingerprints.

A check of many weights costs one launch and one device sync this way, instead of a gather and a
sync per weight. The addresses must point into live device memory of at least ``run`` bytes each
(the caller checks that the tensors are still where they were stamped).
"""

from __future__ import annotations

import torch

from ._runtime import kernels_for


def read_byte_runs(addrs: torch.Tensor, run: int) -> torch.Tensor:
    """``run`` bytes from each int64 address of ``addrs`` (on the memory's device): uint8 [len, run]."""
    if addrs.dtype != torch.int64 or addrs.dim() != 1:
        raise ValueError(f"qbackend probe: addresses must be 1-D int64, got {addrs.dtype} {tuple(addrs.shape)}")
    if run < 1 or run & (run - 1):
        raise ValueError(f"qbackend probe: run must be a power of two, got {run}")
    out = torch.empty((addrs.numel(), run), dtype=torch.uint8, device=addrs.device)
    if addrs.numel():
        kern, _ = kernels_for(addrs.device)
        kern.read_runs_kernel[(addrs.numel(),)](addrs, out, RUN=run, num_warps=1)
    return out
