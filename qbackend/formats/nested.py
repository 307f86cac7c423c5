"""Nested ("double") quantization of fp32 block constants, exactly as QLoRA/bitsandbytes store them.

offset = mean(absmax); the centred constants are quantized with the signed dynamic 8-bit map in
blocks of ``blocksize`` (256 by default) with an fp32 absmax per block. Decoding:
``absmax_i = dynamic[q_i] * absmax2[i // blocksize] + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockwise import blockwise_decode, blockwise_dynamic_codes


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
    """Quantize fp32 block constants ``absmax`` to the nested 8-bit form."""
    absmax = absmax.float().reshape(-1)
    offset = absmax.mean()
    codes, absmax2 = blockwise_dynamic_codes(absmax - offset, blocksize)
    return NestedConstants(codes=codes, absmax2=absmax2, offset=offset, blocksize=blocksize)
