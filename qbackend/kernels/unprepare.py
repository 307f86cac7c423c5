"""The inverse of :func:`~qbackend.kernels.prepare_weight`: the `QuantizedWeight` a kernel's tensors hold.

Modules that run a kernel keep its tensors (``KernelWeight.tensors``, by ``KernelWeight.names``);
describing such a module as a format record needs them back in the canonical layout. This is the
one place that knows ``prepare_weight``'s layout in reverse, so it lives beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..formats import FormatError, QuantizedWeight, Scheme
from ..formats.nested import NestedConstants


def weight_from_kernel_tensors(
    scheme: Scheme, n: int, k: int, get: Callable[[str], torch.Tensor | None], name: str
) -> QuantizedWeight:
    """The `QuantizedWeight` of an ``[n, k]`` linear weight in ``scheme`` whose kernel tensors ``get`` returns.

    ``get(name)``: the kernel tensor ``name`` or None. Names (the op families' tensor names):
    ``codes``, ``absmax`` or ``nested_codes`` / ``nested_absmax`` / ``nested_offset`` (nf4/fp4),
    ``scale`` and ``zero_point`` (int). Exact: per-channel/per-tensor int scales are held expanded
    (one per row) and come back as they were; nested int4 group constants are held decoded, so they
    come back plain (``scheme.nested`` off: the same values the kernels use). Raises `FormatError`
    naming ``name.<tensor>`` when one is missing.
    """

    def need(b: str) -> torch.Tensor:
        t = get(b)
        if t is None:
            raise FormatError(f"{name}.{b}: missing (needed by {scheme.name})")
        return t

    codes = need("codes").reshape(-1)
    if scheme.kind in ("nf4", "fp4"):
        if scheme.nested:
            nested = NestedConstants(need("nested_codes").reshape(-1), need("nested_absmax").reshape(-1),
                                     need("nested_offset").reshape(()), scheme.nested_blocksize)  # fmt: skip
            return QuantizedWeight(scheme, (n, k), torch.float32, codes, None, None, nested)
        return QuantizedWeight(scheme, (n, k), torch.float32, codes, need("absmax").reshape(-1))
    scale, zp = need("scale"), get("zero_point")
    if scheme.granularity == "block":  # int4 groups along K: held [N, groups]
        return QuantizedWeight(replace(scheme, nested=False), (n, k), torch.float32, codes, scale, zp)

    def per_row(t: torch.Tensor | None) -> torch.Tensor | None:  # held one per output row
        if t is None:
            return None
        return t.reshape(-1)[:1].clone() if scheme.granularity == "tensor" else t.reshape(-1)

    return QuantizedWeight(scheme, (n, k), torch.float32, codes, per_row(scale), per_row(zp))
