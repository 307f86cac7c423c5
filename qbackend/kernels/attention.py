"""``qbackend::decode_attention``: scaled dot-product attention for a few query positions (LLM decode).

``decode_attention(query, key, value, attn_mask=None, scale=None, is_causal=False)`` computes
exactly what ``F.scaled_dot_product_attention(query, key, value, attn_mask, scale=scale,
is_causal=is_causal, enable_gqa=True)`` does (no dropout): 4-D ``[B, H, L, D]`` tensors, query head
``i`` reading key/value head ``i // (Hq / Hk)``, ``attn_mask`` bool (True = attend) or additive float,
broadcastable to ``[B, Hq, L, S]``, ``is_causal`` top-left aligned as in sdpa. The default kernel is
that sdpa call (the reference); on CPU, fp32 tensors run the fused C++ kernel
(``cpu/decode_attention.cpp``): one pass over K/V per KV head for every query head that reads it,
K/V read in place through their strides (a static cache's heads, no repeated copies), online softmax
with fp32 accumulation (matches sdpa to ~1e-6 relative). It has no autograd: the pass that inserts
it (:mod:`qbackend.passes.decode_attention`) does so only where no gradient is needed.

Compiled code calls the CPU kernel without the dispatcher (:func:`install_direct`, the same hook as
:mod:`qbackend.kernels.direct`): the op is ~25 us a call at decode, where dispatch costs ~10.
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .spec import NAMESPACE

__all__ = ["decode_attention", "decode_attention_cpu", "decode_attention_reference", "install_direct", "run_kernel"]

OP_NAME = "decode_attention"
_MASK_NONE, _MASK_BOOL, _MASK_FLOAT = 0, 1, 2


def _check(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, is_causal: bool) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"decode_attention: query, key, value must be 4-D [B, H, L, D]; got {query.dim()}-D, "
                         f"{key.dim()}-D, {value.dim()}-D")  # fmt: skip
    b, hq, _, d = query.shape
    if key.shape[0] != b or value.shape[0] != b or key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
        raise ValueError(f"decode_attention: key {tuple(key.shape)} and value {tuple(value.shape)} do not match "
                         f"query {tuple(query.shape)} (same batch, heads and positions)")  # fmt: skip
    if key.shape[3] != d or key.shape[1] == 0 or hq % key.shape[1] != 0:
        raise ValueError(f"decode_attention: key {tuple(key.shape)} must have head dim {d} and a head count dividing "
                         f"the query's {hq}")  # fmt: skip
    if attn_mask is not None:
        if is_causal:
            raise ValueError("decode_attention: pass attn_mask or is_causal, not both (as sdpa)")
        if attn_mask.dim() > 4:
            raise ValueError(f"decode_attention: attn_mask must have at most 4 dims; got {attn_mask.dim()}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise ValueError(f"decode_attention: attn_mask must be bool or {query.dtype}; got {attn_mask.dtype}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, hq, query.shape[2], key.shape[2]))
        except RuntimeError:
            raise ValueError(f"decode_attention: attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                             f"{(b, hq, query.shape[2], key.shape[2])}") from None  # fmt: skip


def decode_attention_reference(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                               scale: float | None = None, is_causal: bool = False) -> Tensor:  # fmt: skip
    """The op's meaning: sdpa with grouped-query heads (the oracle for the kernel)."""
    gqa = key.shape[1] != query.shape[1]
    return F.scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=gqa)


def _lib() -> ctypes.CDLL | None:
    from .cpu import lib  # the library loads (and may compile) on first use only

    return lib()


def _fast_ok(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None) -> bool:
    if not (query.dtype is key.dtype is value.dtype is torch.float32 and query.is_cpu and key.is_cpu and value.is_cpu):
        return False
    if query.stride(3) != 1 or key.stride(3) != 1 or value.stride(3) != 1:
        return False
    return attn_mask is None or (attn_mask.is_cpu and attn_mask.dtype in (torch.bool, torch.float32))


_tls = threading.local()


def _dims() -> ctypes.Array:
    """This thread's argument array for the kernel's dims (filled per call; no allocation)."""
    arr = getattr(_tls, "dims", None)
    if arr is None:
        arr = _tls.dims = (ctypes.c_int64 * 24)()
    return arr


def decode_attention_cpu(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                         scale: float | None = None, is_causal: bool = False) -> Tensor:  # fmt: skip
    """The CPU kernel (arguments already checked): the C++ kernel for fp32 tensors with unit stride along
    the head dim, else the reference."""
    lib = _lib()
    out = None if lib is None else run_kernel(lib, query, key, value, attn_mask, scale, is_causal)
    return decode_attention_reference(query, key, value, attn_mask, scale, is_causal) if out is None else out


def run_kernel(lib: ctypes.CDLL, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
               scale: float | None = None, is_causal: bool = False) -> Tensor | None:  # fmt: skip
    """The C++ kernel of library ``lib`` (any ISA variant; checked arguments), contiguous [B, Hq, L, Dv];
    None where it does not apply (not fp32 CPU tensors with unit stride along the head dim)."""
    if not _fast_ok(query, key, value, attn_mask):
        return None
    b, hq, n, d = query.shape
    hk, s, dv = key.shape[1], key.shape[2], value.shape[3]
    out = torch.empty(b, hq, n, dv, dtype=torch.float32)
    qs, ks, vs = query.stride(), key.stride(), value.stride()
    if attn_mask is None:
        mptr, kind, msize, mstride = None, _MASK_NONE, (1, 1, 1, 1), (0, 0, 0, 0)
    else:
        m = attn_mask if attn_mask.dim() == 4 else attn_mask.view((1,) * (4 - attn_mask.dim()) + attn_mask.shape)
        kind = _MASK_BOOL if m.dtype is torch.bool else _MASK_FLOAT
        mptr, msize, mstride = m.data_ptr(), m.shape, m.stride()
    dims = _dims()
    dims[:] = (b, hq, hk, n, s, d, dv, qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], *msize, *mstride)
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    rc = lib.qb_decode_attention(query.data_ptr(), key.data_ptr(), value.data_ptr(), mptr, out.data_ptr(), dims,
                                 kind, sc, int(is_causal), torch.get_num_threads())  # fmt: skip
    return out if rc == 0 else None


@torch.library.custom_op(f"{NAMESPACE}::{OP_NAME}", mutates_args=())
def decode_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                     scale: float | None = None, is_causal: bool = False) -> Tensor:  # fmt: skip
    """sdpa(query, key, value, attn_mask, scale=scale, is_causal=is_causal, enable_gqa=True), no dropout."""
    _check(query, key, value, attn_mask, is_causal)
    return decode_attention_reference(query, key, value, attn_mask, scale, is_causal).contiguous()


@decode_attention.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, scale: float | None = None,
      is_causal: bool = False) -> Tensor:  # fmt: skip
    _check(query, key, value, attn_mask, is_causal)
    return query.new_empty(*query.shape[:3], value.shape[3])


@decode_attention.register_kernel("cpu")
def _(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, scale: float | None = None,
      is_causal: bool = False) -> Tensor:  # fmt: skip
    _check(query, key, value, attn_mask, is_causal)
    return decode_attention_cpu(query, key, value, attn_mask, scale, is_causal).contiguous()


def _direct(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, scale: float | None = None,
            is_causal: bool = False) -> Tensor:  # fmt: skip
    # Compiled code: the fake checked the arguments at trace time; the output must be contiguous (the fake's strides).
    return decode_attention_cpu(query, key, value, attn_mask, scale, is_causal).contiguous()


# what compiled code runs for the op on CPU (qbackend.kernels.direct.KERNELS looks it up here)
ops._DIRECT[(OP_NAME, "cpu")] = _direct


def install_direct() -> None:
    """Make compiled code call the CPU kernel without the dispatcher (idempotent; loads Inductor)."""
    from . import direct

    direct.install_op(OP_NAME)
