"""The "bf16" compute mode of the weight-only linears on CPU (``bf16_compute.cpp``, AVX512-BF16).

Numerics (:mod:`qbackend.kernels.reference`, "bf16"): x rounded to bf16, NF4/FP4 table values rounded
to bf16, block/group constants fp32, int4/int8 codes exact; fp32 accumulation. Two kernels:

* small M (<= :data:`FUSED_MAX_M`): codes decoded to bf16 in registers, ``vdpbf16ps`` dot products,
  the block constant applied to the fp32 accumulator lane by lane (exactly the reference's operands);
* large M (off by default, see :data:`FUSED_MAX_M`): panels of W decoded to bf16 (so the weight itself
  is rounded to bf16, which the contract allows: a relative 2^-8 per product) and multiplied by MKL's
  bf16 x bf16 -> fp32 GEMM (``cblas_gemm_bf16bf16f32`` from torch's own MKL), one panel per pool thread;
* int8 weights: the fp32 int8 kernels on x rounded to bf16 (the same operands, measured faster).

Cases without a kernel (no AVX512-BF16, K % 8 != 0 or non-power-of-two blocks for 4-bit weights,
no C++ library) run the reference: correct, slow; :func:`has_fast_kernel` says which.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from .. import reference as ref
from . import _build
from ._tensors import out as _out
from ._tensors import ptr as _ptr
from ._tensors import x2d as _x2d

log = logging.getLogger(__name__)

# Up to this many rows the fused kernel; above, bf16 panels + MKL's bf16 GEMM. On the project's 2-core
# Zen 4 MKL's bf16 GEMM measured slower than the fused kernel at every M (M = 64: 1.2x vs 2.9x fp32
# F.linear; M = 480: 0.64x vs 1.46x; benchmarks/bench_cpu_compute_bf16.py), so it is off by default; it
# is a switch for CPUs where MKL's bf16 GEMM is fast.
FUSED_MAX_M = 1 << 62
# int8 weights: this module's bf16 kernel instead of the fp32 int8 kernel on bf16-rounded x (slower here).
USE_BF16_INT8 = False
# Rows of W per decoded bf16 panel (per thread): 64 x 4096 x 2 bytes = 512 KiB.
PANEL_ELEMS = 64 * 4096


class QBF(ctypes.Structure):
    """Mirror of ``struct QBF`` in bf16_compute.cpp."""

    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("absmax", ctypes.c_void_p),
        ("ncodes", ctypes.c_void_p),
        ("nabsmax", ctypes.c_void_p),
        ("ntable", ctypes.c_void_p),
        ("noffset", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("zp", ctypes.c_void_p),
        ("is_int4", ctypes.c_int32),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("bs", ctypes.c_int64),
        ("nbs", ctypes.c_int64),
        ("G", ctypes.c_int64),
    ]


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The kernel library with this module's functions declared, or None where "bf16" has no kernel here."""
    lib = _build.load()
    if lib is None:
        return None
    P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    q = ctypes.POINTER(QBF)
    lib.qbbf_available.restype = INT
    lib.qbbf_fast4_ok.argtypes = [q]
    lib.qbbf_fast4_ok.restype = INT
    lib.qbbf_linear4.argtypes = [q, P, I64, P, P, INT]
    lib.qbbf_linear4.restype = INT
    lib.qbbf_linear8.argtypes = [P, P, I64, I64, P, I64, P, P, INT]
    lib.qbbf_linear8.restype = INT
    lib.qbbf_set_gemm.argtypes = [P, P]
    lib.qbbf_set_gemm.restype = INT
    lib.qbbf_panel.argtypes = [q, P, P, I64, I64, P, I64, P, P, INT, I64]
    lib.qbbf_panel.restype = INT
    return lib if lib.qbbf_available() else None


@functools.cache
def _has_gemm() -> bool:
    """Hand MKL's ``cblas_gemm_bf16bf16f32`` (exported by torch's libtorch_cpu) to the library."""
    lib = _lib()
    if lib is None:
        return False
    found = _build.torch_cpu_symbols("cblas_gemm_bf16bf16f32", "MKL_Set_Num_Threads_Local")
    if found is None:
        return False
    ok = bool(lib.qbbf_set_gemm(*found))
    if not ok:
        log.info("qbackend: MKL's bf16 GEMM failed the check multiply; large-M bf16 linears use the fused kernel")
    return ok


def available() -> bool:
    """Whether this CPU runs the bf16 kernels (AVX512-BF16 and the C++ library)."""
    return _lib() is not None


def _panel_rows(k: int, n: int) -> int:
    return max(16, min(n, PANEL_ELEMS // max(k, 1) // 16 * 16))


def _run4(lib: ctypes.CDLL, q: QBF, x: Tensor, bias: Tensor | None, n: int, k: int) -> Tensor:
    x2 = _x2d(x, k)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return _out(y, x, n)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    nt = torch.get_num_threads()
    if m > FUSED_MAX_M and _has_gemm():
        xb = x2.to(torch.bfloat16)
        if lib.qbbf_panel(ctypes.byref(q), None, None, n, k, xb.data_ptr(), m, _ptr(b), y.data_ptr(), nt,
                          _panel_rows(k, n)) == 0:  # fmt: skip
            return _out(y, x, n)
    if lib.qbbf_linear4(ctypes.byref(q), x2.data_ptr(), m, _ptr(b), y.data_ptr(), nt) != 0:
        raise RuntimeError("qbackend: the bf16 4-bit kernel refused a shape it reported as covered")
    return _out(y, x, n)


def _fast4(lib: ctypes.CDLL | None, q: QBF) -> bool:
    return lib is not None and bool(lib.qbbf_fast4_ok(ctypes.byref(q)))


def codebook_linear(
    x: Tensor, codes: Tensor, absmax: Tensor | None, nested_codes: Tensor | None, nested_absmax: Tensor | None,
    nested_offset: Tensor | None, table: Tensor, nested_table: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> Tensor:  # fmt: skip
    """``codebook_linear`` (nf4, fp4) in "bf16" compute."""
    lib = _lib()
    c = codes.contiguous()
    nc = None if nested_codes is None else nested_codes.contiguous()
    a, na, nt, no, tb = (None if t is None else t.to(torch.float32).contiguous()
                         for t in (absmax, nested_absmax, nested_table, nested_offset, table))  # fmt: skip
    q = QBF(codes=c.data_ptr(), absmax=_ptr(a), ncodes=_ptr(nc), nabsmax=_ptr(na), ntable=_ptr(nt), noffset=_ptr(no),
            table=_ptr(tb), scale=None, zp=None, is_int4=0, N=out_features, K=in_features, bs=blocksize,
            nbs=nested_blocksize, G=0)  # fmt: skip
    if not _fast4(lib, q) or -(-out_features * in_features // blocksize) >= 2**31:
        return ref.codebook_linear(x, codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
                                   bias, out_features, in_features, blocksize, nested_blocksize, "bf16")  # fmt: skip
    assert lib is not None
    return _run4(lib, q, x, bias, out_features, in_features)


def int4_linear(
    x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, groupsize: int,
) -> Tensor:  # fmt: skip
    """``int4_linear`` in "bf16" compute."""
    lib = _lib()
    c = codes.contiguous()
    s = scale.to(torch.float32).contiguous()
    z = None if zero_point is None else zero_point.contiguous()
    g = -(-in_features // groupsize)
    q = QBF(codes=c.data_ptr(), absmax=None, ncodes=None, nabsmax=None, ntable=None, noffset=None, table=None,
            scale=s.data_ptr(), zp=_ptr(z), is_int4=1, N=out_features, K=in_features, bs=groupsize, nbs=0,
            G=g)  # fmt: skip
    if not _fast4(lib, q):
        return ref.int4_linear(x, codes, scale, zero_point, bias, out_features, in_features, groupsize, "bf16")
    assert lib is not None
    return _run4(lib, q, x, bias, out_features, in_features)


def int8_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_features: int, in_features: int
) -> Tensor:
    """``int8_linear`` in "bf16" compute: the fp32 int8 kernels on x rounded to bf16.

    int8 codes are exact in bf16, so this is exactly the reference's "bf16" operands; measured faster
    than this module's bf16 int8 kernel (``qbbf_linear8``, kept for :data:`USE_BF16_INT8`) at every M on
    the project's Zen 4 (the int8 decode, not the dot product, is the cost).
    """
    if USE_BF16_INT8 and _lib() is not None:
        return _int8_bf16_kernel(x, codes, scale, bias, out_features, in_features)
    from . import int8_linear as fp32_int8_linear  # the package's fp32 kernel (imported late: no cycle)

    y = fp32_int8_linear(x.to(torch.bfloat16).float(), codes, scale, bias, out_features, in_features)
    return y.to(x.dtype)


def _int8_bf16_kernel(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_features: int, in_features: int
) -> Tensor:
    lib = _lib()
    assert lib is not None
    x2 = _x2d(x, in_features)
    m = x2.shape[0]
    n, k = out_features, in_features
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return _out(y, x, n)
    c = codes.contiguous()
    s = scale.to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    nt = torch.get_num_threads()
    if m > FUSED_MAX_M and _has_gemm():
        xb = x2.to(torch.bfloat16)
        if lib.qbbf_panel(None, c.data_ptr(), s.data_ptr(), n, k, xb.data_ptr(), m, _ptr(b), y.data_ptr(), nt,
                          _panel_rows(k, n)) == 0:  # fmt: skip
            return _out(y, x, n)
    if lib.qbbf_linear8(c.data_ptr(), s.data_ptr(), n, k, x2.data_ptr(), m, _ptr(b), y.data_ptr(), nt) != 0:
        raise RuntimeError("qbackend: the bf16 int8 kernel refused a shape")
    return _out(y, x, n)


def has_fast_kernel(family: str, ints: Mapping[str, int]) -> bool:
    """Whether a layer of ``family`` (nf4, fp4, int4, int8) with these op ints runs a bf16 kernel here."""
    if _lib() is None:
        return False
    if family == "int8":
        return True
    k = int(ints.get("in_features", 0))
    if k <= 0 or k % 8:
        return False
    if family == "int4":
        g = int(ints.get("groupsize", 0))
        return g >= k or (g >= 8 and g & (g - 1) == 0)
    bs = int(ints.get("blocksize", 0))
    return bs >= 8 and bs & (bs - 1) == 0
