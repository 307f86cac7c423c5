"""Tensor plumbing shared by the ctypes wrappers of the CPU kernels (they run on every call: the
common case, fp32 contiguous 2-D, takes no tensor op)."""

from __future__ import annotations

from collections.abc import Callable

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


def run_rows(x: Tensor, n: int, k: int, kernel: Callable[[Tensor, int, Tensor], int],
             reference_rows: Callable[[Tensor], Tensor]) -> Tensor:  # fmt: skip
    """y = x @ W^T (+ bias) by ``kernel(x2, m, y)`` (x as fp32 [M, K] into a fresh fp32 [M, N]), which returns
    how many rows of x held NaN/Inf, or < 0 for a case it does not cover. Those rows (or, when < 0, all of
    x) go through ``reference_rows``, which computes them as the contract says."""
    x2 = x2d(x, k)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m > 0:
        nbad = kernel(x2, m, y)
        if nbad < 0:
            return reference_rows(x)
        if nbad > 0:
            bad = ~torch.isfinite(x2).all(dim=1)
            y[bad] = reference_rows(x2[bad]).float()
    return out(y, x, n)
