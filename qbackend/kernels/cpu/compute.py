"""CPU kernels of the weight-only ops for the "bf16", "int8" and "int16" compute modes.

The numerics of each mode are defined by :mod:`qbackend.kernels.reference`. Each mode has its own
module (:mod:`.int8_compute`, :mod:`.int16_compute`, :mod:`.bf16_compute`) exposing ``codebook_linear``,
``int4_linear``, ``int8_linear`` (the reference's signatures, without ``compute``) and ``has_fast_kernel``; a
case a mode's module does not cover runs the reference there (correct, slow), and
:func:`has_fast_kernel` tells the ``"auto"`` policy which cases those are.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

from torch import Tensor

from . import bf16_compute, int8_compute, int16_compute

#: the module of each non-fp32 mode (the "fp32" kernels are this package's ``__init__``)
_MODULES: dict[str, ModuleType] = {"int8": int8_compute, "int16": int16_compute, "bf16": bf16_compute}


def has_fast_kernel(compute: str, family: str, ints: Mapping[str, int]) -> bool:
    """Whether a layer of op family ``family`` (nf4, fp4, int4, int8) with these op ints
    (out_features, in_features, blocksize/groupsize, ...) runs a fast kernel in ``compute`` on this CPU."""
    if compute == "fp32":
        return True
    return bool(_MODULES[compute].has_fast_kernel(family, ints))


def codebook_linear(
    x: Tensor, codes: Tensor, absmax: Tensor | None, nested_codes: Tensor | None, nested_absmax: Tensor | None,
    nested_offset: Tensor | None, table: Tensor, nested_table: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int, compute: str,
) -> Tensor:  # fmt: skip
    """``codebook_linear`` (nf4, fp4) in ``compute`` "bf16", "int8" or "int16"."""
    args = (x, codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table, bias,
            out_features, in_features, blocksize, nested_blocksize)  # fmt: skip
    return _MODULES[compute].codebook_linear(*args)


def int4_linear(
    x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, groupsize: int, compute: str,
) -> Tensor:  # fmt: skip
    """``int4_linear`` in ``compute`` "bf16", "int8" or "int16"."""
    args = (x, codes, scale, zero_point, bias, out_features, in_features, groupsize)
    return _MODULES[compute].int4_linear(*args)


def int8_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_features: int, in_features: int, compute: str
) -> Tensor:
    """``int8_linear`` in ``compute`` "bf16", "int8" or "int16"."""
    args = (x, codes, scale, bias, out_features, in_features)
    return _MODULES[compute].int8_linear(*args)
