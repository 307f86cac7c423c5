"""CPU W8A8 (SmoothQuant) linear on an exact int8 GEMM (``w8a8.cpp``: AVX512-VNNI ``vpdpbusd``).

The activations are quantized in the kernel's prologue (per token, or with the static scale) exactly as
:func:`qbackend.kernels.reference.w8a8_linear` does, the int8 x int8 products are summed in int32
(exact), and the scales are applied in the epilogue in the reference's order, so the result equals the
reference bit for bit. Two layouts of the weight: the canonical [N, K] codes (reductions per row of W),
and a panel-packed copy made on first use (:func:`packed_weight`: 16 output columns per vector, one
broadcast of 4 bytes of x feeding them, no reductions), 1.5-3x faster on MiniLM's layers and the one
used wherever it can be made. Measured against the library int8 GEMMs of torch (``torch._int_mm``, oneDNN's
``qlinear_pointwise``) with ``benchmarks/bench_cpu_w8a8_libs.py``; see that script for the figures.

:func:`w8a8_linear` returns None where this kernel does not run (no library, no VNNI, K > 131072):
the caller then uses its own path.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from . import _build
from ._packed import PackedCache
from ._tensors import out as _out

# From this many rows of x, torch's int8 GEMM (oneDNN) instead of the VNNI tiles. Measured on the
# project's 2-core Zen 4 under load (4096x4096, best call / median): M = 64 tiles 3.3 / 9.6 ms vs
# _int_mm 6.5 / 8.3 ms; M = 480 tiles 42 / 56 ms vs _int_mm 22 / 41 ms. Between them: unmeasured.
LIBRARY_MIN_M = 128


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = _build.load()
    if lib is None:
        return None
    P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qbw8_available.restype = INT
    lib.qbw8_linear.argtypes = [P, I64, I64, P, P, I64, P, P, P, INT]
    lib.qbw8_linear.restype = INT
    lib.qbw8_quantize.argtypes = [P, I64, I64, P, P, I64, P, P, P, INT]
    lib.qbw8_quantize.restype = None
    lib.qbw8_epilogue.argtypes = [P, I64, I64, P, P, P, P, P, INT]
    lib.qbw8_epilogue.restype = None
    lib.qbw8_packed_bytes.argtypes = [I64, I64]
    lib.qbw8_packed_bytes.restype = I64
    lib.qbw8_pack.argtypes = [P, I64, I64, P]
    lib.qbw8_pack.restype = None
    lib.qbw8_linear_packed.argtypes = [P, I64, I64, P, P, I64, P, P, P, INT]
    lib.qbw8_linear_packed.restype = INT
    lib.qbw8_linear_packed_finite.argtypes = [P, I64, I64, P, P, I64, P, P, P, INT]
    lib.qbw8_linear_packed_finite.restype = INT
    return lib if lib.qbw8_available() else None


def available() -> bool:
    """Whether the VNNI W8A8 kernel runs on this CPU (else :func:`w8a8_linear` returns None)."""
    return _lib() is not None


def w8a8_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, act_scale: Tensor | None,
    out_features: int, in_features: int,
) -> Tensor | None:  # fmt: skip
    """``w8a8_linear`` (the reference's signature) on the VNNI kernel, or None where it does not run."""
    lib = _lib()
    if lib is None or in_features > 131072:
        return None
    xf = x.reshape(-1, in_features)
    if xf.dtype is not torch.float32 or not xf.is_contiguous():
        xf = xf.to(torch.float32).contiguous()
    m = xf.shape[0]
    y = torch.empty(m, out_features, dtype=torch.float32)
    if m:
        packed = packed_weight(codes, out_features, in_features) if codes.is_contiguous() else None
        codes = codes.contiguous()
        sc = scale.to(torch.float32).contiguous()
        b = None if bias is None else bias.to(torch.float32).contiguous()
        a = None if act_scale is None else act_scale.to(torch.float32).reshape(1).contiguous()
        nt = torch.get_num_threads()
        if packed is not None:
            rc = lib.qbw8_linear_packed(xf.data_ptr(), m, in_features, packed.data_ptr(), sc.data_ptr(),
                                        out_features, None if b is None else b.data_ptr(),
                                        None if a is None else a.data_ptr(), y.data_ptr(), nt)  # fmt: skip
            if rc == 0:
                return _out(y, x, out_features)
        # (torch 2.13's CPU _int_mm returns wrong sums for K = 1: found by the tests; short K gains nothing)
        if m >= LIBRARY_MIN_M and in_features >= 64:
            _library_gemm(lib, xf, codes, sc, b, a, y, out_features, in_features, nt)
            return _out(y, x, out_features)
        rc = lib.qbw8_linear(xf.data_ptr(), m, in_features, codes.data_ptr(), sc.data_ptr(), out_features,
                             None if b is None else b.data_ptr(), None if a is None else a.data_ptr(), y.data_ptr(),
                             nt)  # fmt: skip
        if rc != 0:
            return None
    return _out(y, x, out_features)


def _library_gemm(lib, xf: Tensor, codes: Tensor, sc: Tensor, b: Tensor | None, a: Tensor | None, y: Tensor,
                  n: int, k: int, nt: int) -> None:  # fmt: skip
    """Large M: this module's quantization prologue, torch's int8 GEMM (``torch._int_mm``, exact int32), and
    this module's epilogue (the reference's scale order)."""
    m = xf.shape[0]
    xq = torch.empty(m, k, dtype=torch.int8)
    xsum = torch.empty(m, dtype=torch.int32)
    sx = torch.empty(m, dtype=torch.float32)
    bad = torch.empty(m, dtype=torch.uint8)
    lib.qbw8_quantize(xf.data_ptr(), m, k, None if a is None else a.data_ptr(), xq.data_ptr(), k, xsum.data_ptr(),
                      sx.data_ptr(), bad.data_ptr(), nt)  # fmt: skip
    acc = torch._int_mm(xq, codes.view(n, k).t())
    lib.qbw8_epilogue(acc.data_ptr(), m, n, sx.data_ptr(), sc.data_ptr(), None if b is None else b.data_ptr(),
                      bad.data_ptr(), y.data_ptr(), nt)  # fmt: skip


_F32, _I8 = torch.float32, torch.int8

# Most rows of x the fast call takes on the packed weight. Measured (MiniLM's layers, 2-core Zen 4 under
# load) the packed tiles beat torch's int8 GEMM at M = 480 too.
PACKED_MAX_M = 4096

# Whether calls make and use the packed copy (False: the canonical kernel, no extra memory). The copy
# costs about the int8 weight's size again (n and k rounded up to 16 and 4) per packed layer; measured
# (1 thread, under load) it is also faster at 4096x4096: M = 1 0.63 vs 1.19 ms, M = 64 6.0 vs 12 ms.
PACKING = True


def _packer() -> tuple | None:
    lib = _lib()
    return None if lib is None else (lib.qbw8_packed_bytes, lib.qbw8_pack)


# The copies, keyed per codes tensor (address, version, shape, object: ``_packed.PackedCache``).
_CACHE = PackedCache(_packer)
_PACKED = _CACHE.entries


def packed_weight(codes: Tensor, n: int, k: int) -> Tensor | None:
    """The panel-packed copy of ``codes`` [n, k] for ``qbw8_linear_packed`` (made on first use, about the
    size of ``codes``: n and k rounded up to 16 and 4), or None: no library, or an inference tensor (no
    version counter to see an in-place write by: the canonical kernel reads it instead)."""
    return _CACHE.get(codes, n, k) if PACKING else None


def packed_nbytes() -> int:
    """Bytes held by the packed weight copies alive now (each is freed with its weight)."""
    return _CACHE.nbytes()


def fast_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, act_scale: Tensor | None,
    out_features: int, in_features: int,
) -> Tensor | None:  # fmt: skip
    """:func:`w8a8_linear` for the common call (fp32 contiguous CPU tensors, 0 < M <= PACKED_MAX_M, on the
    packed copy of the weight, :func:`packed_weight`; without one M < LIBRARY_MIN_M; weights the op's
    validation would accept) with attribute checks only, or None: then the caller runs
    the regular path, which computes the same (this is its kernel call) or raises the op's error.
    A non-finite output also returns None (the regular path's overflow retry, ``finite.py``, handles it).
    At MiniLM's sizes the regular path's Python (validation, conversions) took as long as the kernel."""
    n, k = out_features, in_features
    if (
        x.dtype is not _F32 or not x.is_cpu or not x.is_contiguous() or not x.dim() or x.shape[-1] != k
        or codes.dtype is not _I8 or not codes.is_cpu or not codes.is_contiguous() or codes.numel() != n * k
        or scale.dtype is not _F32 or not scale.is_cpu or not scale.is_contiguous() or scale.numel() != n
    ):  # fmt: skip
        return None
    for t, size in ((bias, n), (act_scale, 1)):
        if t is not None and (t.dtype is not _F32 or not t.is_cpu or not t.is_contiguous() or t.numel() != size):
            return None
    m = x.numel() // k if k > 0 else 0
    lib = _lib()
    if lib is None or m <= 0 or m > PACKED_MAX_M or k > 131072:
        return None
    y = torch.empty(m, n)
    packed = packed_weight(codes, n, k)
    if packed is not None:
        rc = lib.qbw8_linear_packed_finite(x.data_ptr(), m, k, packed.data_ptr(), scale.data_ptr(), n,
                                           None if bias is None else bias.data_ptr(),
                                           None if act_scale is None else act_scale.data_ptr(), y.data_ptr(),
                                           torch.get_num_threads())  # fmt: skip
        if rc != 0:  # (2: a non-finite output)
            return None
        return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
    if m >= LIBRARY_MIN_M:
        return None
    rc = lib.qbw8_linear(x.data_ptr(), m, k, codes.data_ptr(), scale.data_ptr(), n,
                         None if bias is None else bias.data_ptr(), None if act_scale is None else act_scale.data_ptr(),
                         y.data_ptr(), torch.get_num_threads())  # fmt: skip
    if rc != 0 or not _build.load().qb_all_finite(y.data_ptr(), m * n):
        return None
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
