"""Nested ("double") quantization of fp32 block constants, exactly as QLoRA/bitsandbytes store them.

offset = mean(absmax); the centred constants are quantized with the signed dynamic 8-bit map in
blocks of ``blocksize`` (256 by default) with an fp32 absmax per block. Decoding:
``absmax_i = dynamic[q_i] * absmax2[i // blocksize] + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockwise import blockwise_decode, blockwise_dynamic_codes, single_threaded
from .scheme import FormatError


@dataclass
class NestedConstants:
    """8-bit codes of the centred block constants, their fp32 absmax per nested block, and the offset."""

    codes: torch.Tensor  # uint8 [nblocks]
    absmax2: torch.Tensor  # fp32 [ceil(nblocks / blocksize)]
    offset: torch.Tensor  # fp32 scalar (0-d)
    blocksize: int = 256

    def decode(self) -> torch.Tensor:
        """The fp32 block constants these stand for."""
        vals = blockwise_decode(self.codes, self.absmax2, self.blocksize, "dynamic", self.codes.numel())
        return vals + self.offset

    def storage_bits(self) -> int:
        return self.codes.numel() * 8 + self.absmax2.numel() * 32 + 32


def nest_constants(absmax: torch.Tensor, blocksize: int = 256) -> NestedConstants:
    """Quantize fp32 block constants ``absmax`` to the nested 8-bit form.

    The offset is ``absmax.mean()`` in fp32 exactly as bitsandbytes computes it, on the caller's
    intra-op threads: torch's parallel sum rounds differently with a different thread count (from
    262144 constants on), so matching bitsandbytes bit for bit means matching its thread count.
    """
    absmax = absmax.float().reshape(-1)
    offset = absmax.mean()
    with single_threaded():  # the remaining passes are small: threads cost more than they give
        return _nest(absmax, offset, blocksize)


def _nest(absmax: torch.Tensor, offset: torch.Tensor, blocksize: int) -> NestedConstants:
    if not bool(torch.isfinite(offset)):
        # Constants near the fp32 maximum overflow the fp32 sum (bitsandbytes then stores an inf
        # offset and NaN constants); a float64 mean keeps such weights usable.
        offset = absmax.double().mean().float()
    centred = absmax - offset
    codes, absmax2 = blockwise_dynamic_codes(centred, blocksize)
    nc = NestedConstants(codes=codes, absmax2=absmax2, offset=offset, blocksize=blocksize)
    if not bool(torch.isfinite(nc.decode()).all()):
        raise FormatError(
            f"block constants up to {float(absmax.abs().max()):.3g} overflow fp32 when decoded from the nested "
            "form; store this weight with nested=False"
        )
    return nc
