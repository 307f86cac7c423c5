"""CPU kernels of the weight-only ops for the "bf16" and "int8" compute modes.

The numerics of each mode are defined by :mod:`qbackend.kernels.reference`. Each mode has its own
module (:mod:`.int8_compute`, :mod:`.bf16_compute`) exposing ``codebook_linear``, ``int4_linear``,
``int8_linear`` (the reference's signatures, without ``compute``) and ``has_fast_kernel``; a
case a mode's module does not cover runs the reference itself (correct, slow), and
:func:`has_fast_kernel` tells the ``"auto"`` policy which cases those are.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

from torch import Tensor

from .. import reference as ref


def _module(compute: str) -> ModuleType | None:
    """The fast module of ``compute``, or None while there is none."""
    try:
        if compute == "int8":
            from . import int8_compute as m
        elif compute == "bf16":
            from . import bf16_compute as m
        else:
            return None
    except ImportError:
        return None
    return m


def has_fast_kernel(compute: str, family: str, ints: Mapping[str, int]) -> bool:
    """Whether a layer of op family ``family`` (nf4, fp4, int4, int8) with these op ints
    (out_features, in_features, blocksize/groupsize, ...) runs a fast kernel in ``compute`` on this CPU."""
    if compute == "fp32":
        return True
    m = _module(compute)
    return m is not None and bool(m.has_fast_kernel(family, ints))


def codebook_linear(
    x: Tensor, codes: Tensor, absmax: Tensor | None, nested_codes: Tensor | None, nested_absmax: Tensor | None,
    nested_offset: Tensor | None, table: Tensor, nested_table: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int, compute: str,
) -> Tensor:  # fmt: skip
    """``codebook_linear`` (nf4, fp4) in ``compute`` "bf16" or "int8"."""
    args = (x, codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table, bias,
            out_features, in_features, blocksize, nested_blocksize)  # fmt: skip
    m = _module(compute)
    if m is not None:
        return m.codebook_linear(*args)
    return ref.codebook_linear(*args, compute)


def int4_linear(
    x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, groupsize: int, compute: str,
) -> Tensor:  # fmt: skip
    """``int4_linear`` in ``compute`` "bf16" or "int8"."""
    args = (x, codes, scale, zero_point, bias, out_features, in_features, groupsize)
    m = _module(compute)
    if m is not None:
        return m.int4_linear(*args)
    return ref.int4_linear(*args, compute)


def int8_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_features: int, in_features: int, compute: str
) -> Tensor:
    """``int8_linear`` in ``compute`` "bf16" or "int8"."""
    args = (x, codes, scale, bias, out_features, in_features)
    m = _module(compute)
    if m is not None:
        return m.int8_linear(*args)
    return ref.int8_linear(*args, compute)
