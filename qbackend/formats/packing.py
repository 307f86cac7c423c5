"""Two 4-bit codes per byte, FIRST element in the HIGH nibble (bitsandbytes order)."""

from __future__ import annotations

import torch


def pack_4bit(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Pack a flat uint8 tensor of 4-bit codes (values 0..15) into ``(n + 1) // 2`` bytes.

    An odd count puts ``pad_code`` in the low nibble of the last byte (bitsandbytes pads with
    the code of 0.0).
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_4bit expects uint8 codes, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad_code)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: the first ``numel`` codes as a flat uint8 tensor."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_4bit expects uint8 bytes, got {packed.dtype}")
    flat = packed.reshape(-1)
    if numel > 2 * flat.numel():
        raise ValueError(f"cannot unpack {numel} codes from {flat.numel()} bytes")
    out = torch.stack([flat >> 4, flat & 0xF], dim=-1).view(-1)
    return out[:numel]
