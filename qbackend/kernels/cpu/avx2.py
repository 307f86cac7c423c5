"""The fused fp32 kernels of the "avx2" build (``qlinear_avx2.cpp``): CPUs with AVX2 + FMA, no AVX-512.

In the other builds their entry points exist but report "not covered" (``qba2_available() == 0``),
so callers can ask any loaded library.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from . import _build


@functools.cache
def _declared(lib: ctypes.CDLL) -> bool:
    """Declare the signatures on ``lib`` (once); True if its build has the AVX2 kernels."""
    P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    try:
        lib.qba2_available.restype = INT
    except AttributeError:  # a library built before these kernels existed
        return False
    lib.qba2_fast4_ok.argtypes = [ctypes.POINTER(_build.QW4)]
    lib.qba2_fast4_ok.restype = INT
    lib.qba2_linear4.argtypes = [ctypes.POINTER(_build.QW4), P, I64, P, P, INT]
    lib.qba2_linear4.restype = INT
    lib.qba2_linear8.argtypes = [P, P, I64, I64, P, I64, P, P, INT]
    lib.qba2_linear8.restype = INT
    return bool(lib.qba2_available())


def linear4(lib: ctypes.CDLL, q: _build.QW4, x2: Tensor, bias: Tensor | None, n: int, nthreads: int) -> Tensor | None:
    """fp32 [M, N] = x2 @ W^T (+ bias) by the fused AVX2 kernels, or None if this build/shape has none.

    x2 is contiguous fp32 [M, K] with M >= 1; bias fp32 contiguous or None.
    """
    if not _declared(lib) or not lib.qba2_fast4_ok(ctypes.byref(q)):
        return None
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = None if bias is None else bias.data_ptr()
    if lib.qba2_linear4(ctypes.byref(q), x2.data_ptr(), x2.shape[0], b, y.data_ptr(), nthreads) != 0:
        return None
    return y


def linear8(lib: ctypes.CDLL, codes: Tensor, scale: Tensor, x2: Tensor, bias: Tensor | None, n: int,
            k: int, nthreads: int) -> Tensor | None:  # fmt: skip
    """fp32 [M, N] = x2 @ (codes * scale)^T (+ bias) by the fused AVX2 kernels, or None without them."""
    if not _declared(lib):
        return None
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = None if bias is None else bias.data_ptr()
    if lib.qba2_linear8(codes.data_ptr(), scale.data_ptr(), n, k, x2.data_ptr(), x2.shape[0], b, y.data_ptr(),
                        nthreads) != 0:  # fmt: skip
        return None
    return y
