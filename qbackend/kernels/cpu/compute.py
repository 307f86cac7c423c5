"""CPU kernels of the weight-only ops for the "bf16" and "int8" compute modes.

The numerics of each mode are defined by :mod:`qbackend.kernels.reference`; until a fast kernel
covers a case, it runs the reference itself (correct, slow).
"""

from __future__ import annotations

from torch import Tensor

from .. import reference as ref


def codebook_linear(
    x: Tensor, codes: Tensor, absmax: Tensor | None, nested_codes: Tensor | None, nested_absmax: Tensor | None,
    nested_offset: Tensor | None, table: Tensor, nested_table: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int, compute: str,
) -> Tensor:  # fmt: skip
    """``codebook_linear`` (nf4, fp4) in ``compute`` "bf16" or "int8"."""
    return ref.codebook_linear(x, codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
                               bias, out_features, in_features, blocksize, nested_blocksize, compute)  # fmt: skip


def int4_linear(
    x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, groupsize: int, compute: str,
) -> Tensor:  # fmt: skip
    """``int4_linear`` in ``compute`` "bf16" or "int8"."""
    return ref.int4_linear(x, codes, scale, zero_point, bias, out_features, in_features, groupsize, compute)


def int8_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_features: int, in_features: int, compute: str
) -> Tensor:
    """``int8_linear`` in ``compute`` "bf16" or "int8"."""
    return ref.int8_linear(x, codes, scale, bias, out_features, in_features, compute)
