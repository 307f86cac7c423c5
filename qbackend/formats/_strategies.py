"""Hypothesis strategies for the formats tests (needs the ``test`` extra: hypothesis).

Weights are drawn as (seed, shape, dtype, pattern) and built with torch's generator: large
tensors stay fast to generate and shrink well, and the patterns aim at the edge cases of block-wise
quantization: exact ties between two codes, all-zero and constant blocks, subnormal and huge
magnitudes, signed zeros, magnitudes that differ wildly between blocks.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from .codebooks import code_table

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATTERNS = (
    "normal", "ties", "zero_blocks", "tiny", "huge", "extreme", "sparse", "constant", "signs", "mixed", "uniform",
)  # fmt: skip

# Largest power of ten each dtype holds comfortably (leaves room for the block maxima).
_HUGE = {torch.float32: 1e37, torch.float16: 1e4, torch.bfloat16: 1e37}
_TINY = {torch.float32: 1e-40, torch.float16: 1e-6, torch.bfloat16: 1e-40}


def make_weight(
    seed: int, shape: tuple[int, ...], dtype: torch.dtype, pattern: str, blocksize: int = 64, table: str = "nf4"
) -> torch.Tensor:
    """A weight of ``shape``/``dtype`` following ``pattern`` (see ``PATTERNS``), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if pattern == "normal":
        x = x * 10.0 ** (int(torch.randint(-3, 4, (), generator=g)))
    elif pattern == "ties":
        # Every element sits exactly on a midpoint between two codes: the block maximum is a power
        # of two (so 1/absmax is exact) and the others are midpoint * 2^k.
        code = code_table(table).double().sort().values
        mids = (code[:-1] + code[1:]) / 2
        k = int(torch.randint(-6, 7, (), generator=g))
        x = mids[torch.randint(0, mids.numel(), (n,), generator=g)] * 2.0**k
        starts = torch.arange(0, n, blocksize)
        x[starts] = torch.where(torch.rand(starts.numel(), generator=g) < 0.5, 1.0, -1.0).double() * 2.0**k
    elif pattern == "zero_blocks":
        nb = -(-n // blocksize)
        keep = (torch.rand(nb, generator=g) < 0.5).double().repeat_interleave(blocksize)[:n]
        x = x * keep
    elif pattern == "tiny":
        x = x * _TINY[dtype]
    elif pattern == "huge":
        x = x * _HUGE[dtype]
    elif pattern == "extreme":
        # The largest finite value of the dtype: 1/absmax is subnormal in fp32.
        x = x / x.abs().max().clamp(min=1e-300) * torch.finfo(dtype).max
    elif pattern == "sparse":
        x = x * (torch.rand(n, generator=g) < 0.05).double()
    elif pattern == "constant":
        x = torch.full((n,), float(x[0]) if n else 1.0, dtype=torch.float64)
    elif pattern == "signs":
        x = torch.where(x < 0, -1.0, 1.0).double() * 0.75
        x[torch.rand(n, generator=g) < 0.1] = -0.0
    elif pattern == "mixed":
        nb = -(-n // blocksize)
        lo, hi = (-4, 4) if dtype == torch.float16 else (-30, 30)
        scale = 10.0 ** torch.randint(lo, hi + 1, (nb,), generator=g).double()
        x = x * scale.repeat_interleave(blocksize)[:n]
    elif pattern == "uniform":
        x = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    else:  # pragma: no cover
        raise ValueError(pattern)
    return x.to(dtype).reshape(shape)


def shapes(max_numel: int = 6000, max_dims: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    """1-D to ``max_dims``-D shapes of at least one element and at most ``max_numel``."""

    def ok(s: tuple[int, ...]) -> bool:
        return 1 <= math.prod(s) <= max_numel

    one = st.tuples(st.integers(1, max_numel))
    two = st.tuples(st.integers(1, 80), st.integers(1, 300))
    three = st.tuples(st.integers(1, 6), st.integers(1, 20), st.integers(1, 200))
    opts = [one, two, three][:max_dims]
    return st.one_of(*opts).filter(ok)


@st.composite
def weights(
    draw: st.DrawFn,
    blocksize: int = 64,
    table: str = "nf4",
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    patterns: tuple[str, ...] = PATTERNS,
    max_numel: int = 6000,
) -> torch.Tensor:
    """A weight tensor (see :func:`make_weight`)."""
    seed = draw(st.integers(0, 2**31 - 1))
    shape = draw(shapes(max_numel))
    dtype = draw(st.sampled_from(dtypes))
    pattern = draw(st.sampled_from(patterns))
    return make_weight(seed, shape, dtype, pattern, blocksize, table)
