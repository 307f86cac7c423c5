"""Fixed code tables: NF4, FP4 (bitsandbytes E2M1 order) and the signed dynamic 8-bit map.

The values are the exact fp32 numbers bitsandbytes uses, so that nearest-code rounding gives the
same codes bit for bit.
"""

from __future__ import annotations

import functools

import torch

NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# bitsandbytes' FP4 in bit-pattern order (sign bit = bit 3), normalised by its max (12). Code 8 is
# +0.0, not -0.0: bitsandbytes writes it as the integer ``-0`` and decodes it to +0.0 on CPU.
_FP4_RAW = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@functools.cache
def _table_cpu(name: str) -> torch.Tensor:
    if name == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if name == "fp4":
        # Divide in fp32 exactly as bitsandbytes does so every entry matches bit for bit.
        t = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return t / t.abs().max()
    if name == "dynamic":
        return _dynamic_map_signed()
    raise ValueError(f"unknown code table {name!r}; known: nf4, fp4, dynamic")


_device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_table(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fp32 code table ``name`` ("nf4", "fp4" or "dynamic") on ``device`` (cached; do not modify)."""
    device = torch.device(device)
    key = (name, device)
    t = _device_tables.get(key)
    if t is None:
        t = _table_cpu(name).to(device)
        _device_tables[key] = t
    return t


def _dynamic_map_signed(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed dynamic-exponent map of Dettmers (2015) used for bnb's nested constants.

    Built with the same fp32 linspace/mean arithmetic and the same float64 powers of ten as
    bitsandbytes' ``create_dynamic_map(signed=True)``, so the 256 values agree exactly.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.cache
def _sorted_midpoints_cpu(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = _table_cpu(name)
    order = torch.argsort(table, stable=True)
    s = table[order]
    return (s[:-1] + s[1:]) / 2, order.to(torch.uint8)


def nearest_code(x: torch.Tensor, name: str) -> torch.Tensor:
    """Index (uint8) of the nearest entry of table ``name`` for each value of fp32 ``x`` in [-1, 1].

    Ties go to the lower table value, as in bitsandbytes (bucketize over the midpoints).
    """
    mids, order = _sorted_midpoints_cpu(name)
    if x.device.type != "cpu":
        mids, order = mids.to(x.device), order.to(x.device)
    idx = torch.bucketize(x, mids, out_int32=True)
    if name == "fp4":
        return order[idx]
    return idx.to(torch.uint8)
