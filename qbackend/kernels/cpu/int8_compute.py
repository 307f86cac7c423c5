"""The ``"int8"`` compute mode of the weight-only ops on CPU (numerics: :mod:`qbackend.kernels.reference`).

Activations are quantized to int8 per row and per 32-block of K in the kernel's prologue (once per
call); the weights stay in their canonical layout and go to AVX512-VNNI ``vpdpbusd`` as unsigned
bytes (see ``int8_compute.cpp``: a GEMV-like kernel below M = 6 (4-bit weights) or 8 (int8), a GEMM
from there with 8 or 16 rows of x per vector and each row of W decoded once per 128 rows of x; no repacked
copy of the weight is kept). Needs a CPU with AVX512-VNNI and VBMI and the library's AVX-512
build; shapes with ``in_features % 32 != 0`` or block/group sizes that are not multiples of 32 run
the reference (:func:`has_fast_kernel` says which). Rows of x holding NaN/Inf are recomputed by
the reference, which computes them in fp32 as the contract says.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .. import reference as ref
from . import _build
from ._tensors import bias32 as _bias32
from ._tensors import contig as _contig
from ._tensors import ptr as _ptr
from ._tensors import run_rows as _run_rows

# Weight kinds (enum QI8Kind in int8_compute.cpp).
KIND_CODEBOOK = 0
KIND_INT4 = 1
KIND_INT8 = 2
_KIND_OF_FAMILY = {"nf4": KIND_CODEBOOK, "fp4": KIND_CODEBOOK, "int4": KIND_INT4, "int8": KIND_INT8}


class QI8W(ctypes.Structure):
    """Mirror of ``struct QI8W`` in int8_compute.cpp."""

    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("absmax", ctypes.c_void_p),
        ("ncodes", ctypes.c_void_p),
        ("nabsmax", ctypes.c_void_p),
        ("ntable", ctypes.c_void_p),
        ("noffset", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("zp", ctypes.c_void_p),
        ("lut", ctypes.c_int8 * 16),
        ("inv_c", ctypes.c_float),
        ("kind", ctypes.c_int32),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("bs", ctypes.c_int64),
        ("nbs", ctypes.c_int64),
        ("G", ctypes.c_int64),
    ]


class QI8Member(ctypes.Structure):
    """Mirror of ``struct QI8Member`` in int8_compute.cpp: one member of a group call."""

    _fields_ = [
        ("w", ctypes.POINTER(QI8W)),
        ("bias", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("saved", ctypes.c_void_p),
        ("table_bytes", ctypes.c_int64),
    ]


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The kernel library with this module's symbols declared, or None (no library, or a build below
    AVX-512: a forced portable variant stands for a CPU without the instructions)."""
    L = _build.load()
    if L is None or _build.cpu_variant() != "avx512":
        return None
    qw = ctypes.POINTER(QI8W)
    L.qbi8_supported.argtypes = [qw]
    L.qbi8_supported.restype = ctypes.c_int
    L.qbi8_linear.argtypes = [qw, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    L.qbi8_linear.restype = ctypes.c_int64
    L.qbi8_linear_prepared.argtypes = [*L.qbi8_linear.argtypes, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    L.qbi8_linear_prepared.restype = ctypes.c_int64
    L.qbi8_linear_group.argtypes = [ctypes.POINTER(QI8Member), ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_int]  # fmt: skip
    L.qbi8_linear_group.restype = ctypes.c_int64
    L.qbi8_group_regions.argtypes = []
    L.qbi8_group_regions.restype = ctypes.c_int64
    L.qbi8_set_gemm_min_m.argtypes = [ctypes.c_int64, ctypes.c_int64]
    L.qbi8_set_gemm_min_m.restype = None
    L.qbi8_gemm_min_m.argtypes = [ctypes.c_int]
    L.qbi8_gemm_min_m.restype = ctypes.c_int64
    L.qbi8_set_gemv16.argtypes = [ctypes.c_int]
    L.qbi8_set_gemv16.restype = None
    L.qbi8_set_stream.argtypes = [ctypes.c_int, ctypes.c_int]
    L.qbi8_set_stream.restype = None
    return L


_stream = (1, 0)  # the library's defaults (g_pf_tiles, g_lanes)


def set_stream(prefetch_tiles: int, lanes: bool) -> tuple[int, bool]:
    """Small-M streaming of the weights (a tuning knob for tests and benchmarks): software prefetch of the
    codes and block constants ``prefetch_tiles`` tiles of rows ahead (0: none), and whether each thread
    walks one contiguous lane of rows (else interleaved units); returns the old pair."""
    global _stream
    L = _lib()
    old = (_stream[0], bool(_stream[1]))
    if L is not None:
        L.qbi8_set_stream(int(prefetch_tiles), int(lanes))
        _stream = (int(prefetch_tiles), int(lanes))
    return old


def set_gemm_min_m(four_bit: int, eight_bit: int) -> tuple[int, int]:
    """Rows of x from which the GEMM kernel runs, for 4-bit and for int8 weights (a tuning knob for tests
    and benchmarks); returns the old pair."""
    L = _lib()
    if L is None:
        return (0, 0)
    old = (int(L.qbi8_gemm_min_m(0)), int(L.qbi8_gemm_min_m(1)))
    L.qbi8_set_gemm_min_m(int(four_bit), int(eight_bit))
    return old


def has_fast_kernel(family: str, ints: Mapping[str, int]) -> bool:
    """Whether a layer of ``family`` (nf4, fp4, int4, int8) with these op ints runs the VNNI kernel here."""
    L = _lib()
    kind = _KIND_OF_FAMILY.get(family)
    if L is None or kind is None:
        return False
    k = int(ints["in_features"])
    bs = int(ints.get("groupsize", ints.get("blocksize", 0)))
    q = QI8W(kind=kind, N=int(ints["out_features"]), K=k, bs=bs, nbs=int(ints.get("nested_blocksize", 0)),
             G=-(-k // bs) if bs > 0 else 0)  # fmt: skip
    return bool(L.qbi8_supported(ctypes.byref(q)))


@functools.lru_cache(maxsize=64)
def _table_image(values: tuple[float, ...]) -> tuple[tuple[int, ...], float]:
    t8, c = ref.int8_table(torch.tensor(values, dtype=torch.float32))
    return tuple(int(v) for v in t8.tolist()), 1.0 / c


# The kernel's descriptor of a weight: pointers into the tensors (contiguous, on the CPU; the caller
# keeps them alive while the descriptor is used) and the shape.


def codebook_weight(codes: Tensor, absmax: Tensor | None, nested_codes: Tensor | None, nested_absmax: Tensor | None,
                    nested_offset: Tensor | None, table: Tensor, nested_table: Tensor | None, n: int, k: int,
                    blocksize: int, nested_blocksize: int) -> QI8W:  # fmt: skip
    """Descriptor of an nf4/fp4 weight; the code table goes in as its int8 image (a copy)."""
    lut, inv_c = _table_image(tuple(table.detach().float().cpu().reshape(-1).tolist()))
    return QI8W(codes=_ptr(codes), absmax=_ptr(absmax), ncodes=_ptr(nested_codes), nabsmax=_ptr(nested_absmax),
                ntable=_ptr(nested_table), noffset=_ptr(nested_offset), lut=(ctypes.c_int8 * 16)(*lut), inv_c=inv_c,
                kind=KIND_CODEBOOK, N=n, K=k, bs=blocksize, nbs=nested_blocksize, G=0)  # fmt: skip


def int4_weight(codes: Tensor, scale: Tensor, zero_point: Tensor | None, n: int, k: int, groupsize: int) -> QI8W:
    """Descriptor of an int4 weight (groups of ``groupsize`` along K)."""
    return QI8W(codes=_ptr(codes), scale=_ptr(scale), zp=_ptr(zero_point), kind=KIND_INT4, N=n, K=k, bs=groupsize,
                G=-(-k // groupsize))  # fmt: skip


def int8_weight(codes: Tensor, scale: Tensor, n: int, k: int) -> QI8W:
    """Descriptor of an int8 per-channel weight."""
    return QI8W(codes=_ptr(codes), scale=_ptr(scale), kind=KIND_INT8, N=n, K=k)


def _run(L: ctypes.CDLL, q: QI8W, x: Tensor, bias: Tensor | None, n: int, k: int,
         reference_rows: Callable[[Tensor], Tensor]) -> Tensor:  # fmt: skip
    """y = x @ W^T (+ bias) by the kernel; rows of x with NaN/Inf through ``reference_rows`` (a case the
    kernel does not cover, which callers rule out with has_fast_kernel's conditions first: all of x)."""
    b = _bias32(bias)
    return _run_rows(x, n, k, lambda x2, m, y: L.qbi8_linear(ctypes.byref(q), x2.data_ptr(), m, _ptr(b), y.data_ptr(),
                                                             torch.get_num_threads()), reference_rows)  # fmt: skip


def codebook_linear(
    x: Tensor, codes: Tensor, absmax: Tensor | None, nested_codes: Tensor | None, nested_absmax: Tensor | None,
    nested_offset: Tensor | None, table: Tensor, nested_table: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> Tensor:  # fmt: skip
    """``codebook_linear`` (nf4, fp4) in "int8" compute."""

    def reference_rows(xr: Tensor) -> Tensor:
        return ref.codebook_linear(xr, codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
                                   bias, out_features, in_features, blocksize, nested_blocksize, "int8")  # fmt: skip

    L = _lib()
    if L is None or (nested_table is not None and nested_table.numel() != 256):  # the kernel reads 256 entries
        return reference_rows(x)
    keep = _contig((codes, absmax, nested_codes, nested_absmax, nested_offset, nested_table))
    q = codebook_weight(*keep[:5], table, keep[5], out_features, in_features, blocksize, nested_blocksize)
    return _run(L, q, x, bias, out_features, in_features, reference_rows)


def int4_linear(
    x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, groupsize: int,
) -> Tensor:  # fmt: skip
    """``int4_linear`` in "int8" compute."""

    def reference_rows(xr: Tensor) -> Tensor:
        return ref.int4_linear(xr, codes, scale, zero_point, bias, out_features, in_features, groupsize, "int8")

    L = _lib()
    if L is None:
        return reference_rows(x)
    keep = _contig((codes, scale, zero_point))
    q = int4_weight(*keep, out_features, in_features, groupsize)
    return _run(L, q, x, bias, out_features, in_features, reference_rows)


def int8_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_features: int, in_features: int
) -> Tensor:
    """``int8_linear`` in "int8" compute."""

    def reference_rows(xr: Tensor) -> Tensor:
        return ref.int8_linear(xr, codes, scale, bias, out_features, in_features, "int8")

    L = _lib()
    if L is None:
        return reference_rows(x)
    keep = _contig((codes, scale))
    q = int8_weight(*keep, out_features, in_features)
    return _run(L, q, x, bias, out_features, in_features, reference_rows)
