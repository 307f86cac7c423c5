"""Block-wise absmax quantization to a code table over the row-major flattened tensor.

This is bitsandbytes' ``quantize_4bit`` / ``quantize_blockwise`` arithmetic, reproduced operation for
operation (reciprocal multiply for full blocks, division for the tail block, bucketize over
midpoints) so the codes and constants are bit-identical.
"""

from __future__ import annotations

import torch

from .codebooks import code_table, nearest_code


def blockwise_absmax_codes(x: torch.Tensor, blocksize: int, table: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, float) block-wise: returns (flat uint8 codes, fp32 absmax per block).

    A partial tail block is allowed. An all-zero block gets absmax 0 and the code of 0.0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    parts_scaled = []
    parts_absmax = []
    if full:
        body = flat[:full].view(-1, blocksize)
        absmax = body.abs().amax(dim=1)
        # Reciprocal then multiply, as bitsandbytes does: changes the last ulp vs. division.
        inv = 1.0 / absmax.clamp(min=1e-38)
        parts_scaled.append(torch.clamp(body * inv[:, None], -1, 1).view(-1))
        parts_absmax.append(absmax)
    if rem:
        tail = flat[full:]
        am = tail.abs().amax().clamp(min=1e-38)
        parts_scaled.append(torch.clamp(tail / am, -1, 1))
        # bitsandbytes stores the clamped tail absmax (1e-38 for an all-zero tail block).
        parts_absmax.append(am.view(1))
    scaled = parts_scaled[0] if len(parts_scaled) == 1 else torch.cat(parts_scaled)
    absmax = parts_absmax[0] if len(parts_absmax) == 1 else torch.cat(parts_absmax)
    return nearest_code(scaled, table), absmax


def blockwise_dynamic_codes(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit block-wise quantization to the signed dynamic map, as bitsandbytes' CPU library does it.

    bitsandbytes (0.50) normalises by ``x * (1 / absmax)``, maps the result to one of 65536 uniform
    bins (``trunc(((v + 1) * 0.5) * 65535 + 0.5)``) and looks the code up in a table built from
    the map's midpoints. We reproduce that table and arithmetic in fp32, so codes are identical.
    An all-zero block stores absmax 0 and code 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    blocks = padded.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # 0/0 blocks -> code 0 below
    v = torch.clamp(blocks * inv[:, None], -1.0, 1.0)
    bins = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    codes = _dynamic_bin_table(flat.device)[bins]
    codes = torch.where((absmax == 0)[:, None], torch.zeros_like(codes), codes)
    return codes.view(-1)[:n], absmax


_bin_tables: dict[torch.device, torch.Tensor] = {}


def _dynamic_bin_table(device: torch.device) -> torch.Tensor:
    """Code of the nearest dynamic-map entry for each of the 65536 bins of [-1, 1]."""
    t = _bin_tables.get(device)
    if t is None:
        code = code_table("dynamic", device)
        mids = 0.5 * (code[:-1] + code[1:])
        centres = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=device)) / 65535
        t = torch.searchsorted(mids, centres, right=False).to(torch.uint8)
        _bin_tables[device] = t
    return t


def blockwise_decode(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, table: str, numel: int
) -> torch.Tensor:
    """fp32 values ``table[code] * absmax[block]`` for the first ``numel`` flat codes."""
    values = code_table(table, codes.device)[codes[:numel].long()]
    nblocks = absmax.numel()
    pad = nblocks * blocksize - numel
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    return (values.view(nblocks, blocksize) * absmax.view(-1, 1)).view(-1)[:numel]
