"""Keep the CPU kernels finite wherever the fp32 product is.

The fused kernels sum ``x * code`` and apply the (block, group or channel) scale after the sum, so
with ``|x|`` near 1e36 the unscaled partial sums overflow fp32 while ``x @ W^T`` itself is finite.
Rather than slow every kernel down, the output is checked (one sum over it) and, only for the rows
where it is not finite although that row of ``x`` is, the call is repeated on those rows times
``2^-k`` (exact: a power of two) with the bias (and a static activation scale) scaled alike, and
the result multiplied back by ``2^k``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import _build

# Inputs are brought below 2^64: partial sums then stay far from fp32's 3.4e38 for any K.
_TARGET_EXPONENT = 64


# Outputs up to this many elements are checked by the library's one-pass loop (cache-resident, one
# thread); larger ones by a torch reduction, which uses every thread.
_C_CHECK_MAX = 1 << 16


def all_finite(y: Tensor) -> bool:
    """Whether every element of ``y`` is finite (True for an empty tensor)."""
    n = y.numel()
    if n == 0:
        return True
    if n <= _C_CHECK_MAX and y.dtype is torch.float32 and y.is_cpu and y.is_contiguous():
        lib = _build.load()
        if lib is not None:
            return bool(lib.qb_all_finite(y.data_ptr(), n))
    # A finite sum means every element is finite (a NaN or Inf anywhere makes it NaN or Inf); one
    # reduction is ~30x cheaper than isfinite().all(). Only a non-finite sum (rare: an overflow,
    # or finite values summing past fp32) pays for the exact test.
    return math.isfinite(float(y.sum())) or bool(torch.isfinite(y).all())


def keep_finite(fn: Callable[..., Tensor], bias_at: int | None, act_scale_at: int | None = None) -> Callable:
    """``fn`` (a kernel taking ``x`` or ``grad_y`` first) with the overflow retry described above.

    bias_at / act_scale_at: positions of the bias and of a static activation scale (None: none).
    """

    @functools.wraps(fn)
    def run(*args: object) -> Tensor:
        y = fn(*args)
        if all_finite(y):
            return y
        x = args[0]
        assert isinstance(x, Tensor)
        # Rows are independent: redo only the rows whose input is finite but whose output is not
        # (a non-finite input row rightly gives a non-finite output, as fp32 does).
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        redo = (~torch.isfinite(y2).all(dim=1) & torch.isfinite(x2).all(dim=1)).nonzero().flatten()
        if redo.numel() == 0:
            return y
        xs = x2.index_select(0, redo)
        amax = float(xs.abs().amax())
        k = math.frexp(amax)[1] - _TARGET_EXPONENT
        if k <= 0:
            return y  # the overflow is not from large inputs (e.g. a huge weight scale): as fp32 would
        scaled = list(args)
        scaled[0] = xs.float() * 2.0**-k
        for at in (bias_at, act_scale_at):
            if at is not None and isinstance(args[at], Tensor):
                scaled[at] = args[at].float() * 2.0**-k
        fixed = (fn(*scaled).float() * 2.0**k).to(y.dtype)
        out = y2.clone()
        out[redo] = fixed.reshape(-1, y2.shape[-1])
        return out.reshape(y.shape)

    return run


#: kernel function name -> (bias position, static activation scale position)
POSITIONS: dict[str, tuple[int | None, int | None]] = {
    "codebook_linear": (8, None),
    "int4_linear": (4, None),
    "int8_linear": (3, None),
    "w8a8_linear": (3, 4),
    "codebook_linear_grad_input": (None, None),
    "int4_linear_grad_input": (None, None),
    "int8_linear_grad_input": (None, None),
}


def wrap(name: str, fn: Callable[..., Tensor] | None) -> Callable[..., Tensor] | None:
    """The CPU kernel ``name`` made finite-preserving (None stays None: no kernel)."""
    if fn is None or name not in POSITIONS:
        return fn
    return keep_finite(fn, *POSITIONS[name])
