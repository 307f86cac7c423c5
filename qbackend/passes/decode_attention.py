"""Decode-time attention on CPU: ``scaled_dot_product_attention`` -> ``qbackend::decode_attention``.

At decode (a few query positions against a KV cache of hundreds) torch's CPU SDPA spends most of its
time in per-head matrix-vector calls and their set-up (TinyLlama: ~170 us a layer at 640 cached
positions). The fused kernel (:mod:`qbackend.kernels.attention`) reads each K/V head once for every
query head that uses it, in place, and is several times faster. Run after
:mod:`qbackend.passes.grouped_kv`: the op takes its ``enable_gqa`` form (unrepeated K/V heads, the static
cache's own tensors), and also K/V with as many heads as the query (strided views included).

Invariant: a rewritten call computes what the SDPA call did (same query/key/value, mask, scale and
causality; the op's meaning is sdpa with ``enable_gqa`` and no dropout, to fp32 rounding), and a call
is rewritten only where that holds and the kernel pays: 4-D fp32 CPU query/key/value with static head
counts and at most :data:`MAX_Q_LEN` (static) query positions, no gradient needed by any input, dropout
a literal 0, ``scale`` absent or a literal number, ``attn_mask`` absent or a bool/fp32 tensor that
broadcasts to ``[B, Hq, L, S]`` (not together with ``is_causal``), head counts that divide. Every other
call (training, GPU, half precision, prefill, dynamic query length) is left untouched.
"""

from __future__ import annotations

import torch
from torch import fx

from ..kernels import attention
from .grouped_kv import SDPA_TARGETS

__all__ = ["MAX_Q_LEN", "use_decode_attention"]

#: most query positions a call may have to be rewritten (decode, speculative decoding's few tokens)
MAX_Q_LEN = 8

_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _value(node: object) -> torch.Tensor | None:
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _bound(node: fx.Node) -> dict[str, object] | None:
    """The call's arguments by name (defaults filled in), or None for arguments this pass does not know."""
    if len(node.args) > len(_PARAMS) or any(k not in _PARAMS for k in node.kwargs):
        return None
    a = dict(_DEFAULTS)
    a.update(zip(_PARAMS, node.args, strict=False))
    a.update(node.kwargs)
    return a if all(p in a for p in _PARAMS[:3]) else None


def _static(*dims: object) -> bool:
    return all(isinstance(d, int) for d in dims)


def _eligible(a: dict[str, object]) -> bool:
    q, k, v = (_value(a[p]) for p in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return False
    for t in (q, k, v):
        if t.dim() != 4 or t.dtype is not torch.float32 or t.device.type != "cpu" or t.requires_grad:
            return False
    dropout, causal, scale, gqa = a["dropout_p"], a["is_causal"], a["scale"], a["enable_gqa"]
    if not (isinstance(dropout, (int, float)) and dropout == 0) or not isinstance(causal, bool):
        return False
    if not (scale is None or (isinstance(scale, (int, float)) and not isinstance(scale, bool))):
        return False
    if not isinstance(gqa, bool):
        return False
    n, hq, hk = q.shape[2], q.shape[1], k.shape[1]
    if not _static(n, hq, hk, v.shape[1]) or not 0 < n <= MAX_Q_LEN or hk == 0 or hk != v.shape[1]:
        return False
    if hq != hk and not (gqa and hq % hk == 0):  # sdpa itself rejects other head counts
        return False
    mask = a["attn_mask"]
    if mask is None:
        return True
    m = _value(mask)
    if m is None or causal or m.requires_grad or m.device.type != "cpu" or m.dtype not in (torch.bool, torch.float32):
        return False
    try:
        torch.broadcast_shapes(m.shape, (q.shape[0], hq, n, k.shape[2]))
    except RuntimeError:
        return False
    return m.dim() <= 4


def use_decode_attention(gm: fx.GraphModule) -> int:
    """Rewrite every eligible SDPA call (see the module docstring) to ``qbackend::decode_attention``;
    returns how many. Compiled code then calls the CPU kernel directly."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        a = _bound(node)
        if a is None or not _eligible(a):
            continue
        scale = None if a["scale"] is None else float(a["scale"])
        node.target = torch.ops.qbackend.decode_attention.default
        node.args = (a["query"], a["key"], a["value"])
        node.kwargs = {"attn_mask": a["attn_mask"], "scale": scale, "is_causal": a["is_causal"]}
        rewritten += 1
    if rewritten:
        attention.install_direct()
        gm.recompile()
    return rewritten
