"""Tensor plumbing shared by the ctypes wrappers of the CPU kernels (they run on every call: the
common case, fp32 contiguous 2-D, takes no tensor op)."""

from __future__ import annotations

import torch
from torch import Tensor


def ptr(t: Tensor | None) -> int | None:
    """The data pointer for a ctypes call, None for an absent tensor."""
    return None if t is None else t.data_ptr()


def x2d(x: Tensor, k: int) -> Tensor:
    """x as contiguous fp32 [M, K] (x itself or a view when it already is)."""
    if x.dtype is torch.float32 and x.is_contiguous():
        return x if x.dim() == 2 else x.view(-1, k)
    return x.reshape(-1, k).to(torch.float32).contiguous()


def bias32(bias: Tensor | None) -> Tensor | None:
    """The bias as contiguous fp32 (itself when it already is)."""
    if bias is None or (bias.dtype is torch.float32 and bias.is_contiguous()):
        return bias
    return bias.to(torch.float32).contiguous()


def out(y: Tensor, x: Tensor, n: int) -> Tensor:
    """The fp32 [M, N] result shaped [..., N] like x and in x's dtype."""
    if x.dim() != 2:
        y = y.view(*x.shape[:-1], n)
    return y if x.dtype is torch.float32 else y.to(x.dtype)


def contig(ts: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """Each tensor contiguous (itself when it already is)."""
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in ts)
