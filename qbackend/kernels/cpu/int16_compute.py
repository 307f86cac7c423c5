"""The ``"int16"`` compute mode of the weight-only ops on CPU (numerics: :mod:`qbackend.kernels.reference`).

Activations are quantized to int16 per row (``reference.INT16_BLOCK``) in the kernel's prologue
(once per call); int8 weights stay in their canonical layout and are sign-extended
to int16 in registers (``int16_compute.cpp``): AVX512-VNNI ``vpdpwssd`` where the CPU has it, else
AVX2 ``vpmaddwd`` (any CPU with AVX2 + FMA). A GEMV-like tile for small M, a GEMM with lanes along M
from ``gemm_min_m`` rows. With AVX512-VNNI, calls run instead on a panel-packed copy of the codes made on
first use (:func:`packed_weight`: 16 output columns x 2 values of K per vector, sign-extended on load, one
broadcast of a pair of x feeding ``vpdpwssd`` against 16 columns, no horizontal reductions; the same
results as the GEMM bit for bit). Memory: about one more int8 weight per layer (n rounded up to 16, k to
32; the 36 linear layers of MiniLM-L6: 10.6 MB, a 4096x4096 layer 16 MB); :data:`PACKING` = False turns it
off, :func:`packed_nbytes` reports it. Measured (1 thread, CPU time): 1.4-2.5x faster than the canonical
kernels at M = 1-8, 1.1-1.2x at M = 64-480, and faster than ONNX Runtime's dynamic int8 MatMul at M = 1
(0.75-0.86x its time on MiniLM's layers); from M = 8 slower than it (1.15-1.5x at M = 8, 1.6-1.9x at
M >= 64): ``vpdpwssd`` does half the multiply-adds of ORT's ``vpdpbusd``, and the kernel runs at that
instruction's throughput from M = 4 or so. Only int8 weights have kernels; NF4/FP4/int4 layers in
this mode run the reference (correct, slow; :func:`has_fast_kernel` says so, so ``"auto"`` never picks
it for them).
Rows of x holding NaN/Inf are recomputed by the reference, which computes them in fp32 as the
contract says.

Layers reading one x (a Llama layer's q/k/v, and gate/up, at decode) run as one group call on their packed
copies (``qbi16_linear8_packed_group``, through :func:`.fast_path.group_linear`): x quantized once, every
member's panels in one thread-pool region, each output bit-identical to the member's own call.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Mapping

import torch
from torch import Tensor

from .. import reference as ref
from . import _build
from ._packed import PackedCache
from ._tensors import bias32 as _bias32
from ._tensors import ptr as _ptr
from ._tensors import run_rows as _run_rows

#: kernel widths (``enum Isa`` in int16_compute.cpp)
ISA_AVX2 = 2
ISA_AVX512_VNNI = 3


def declare(L: ctypes.CDLL) -> ctypes.CDLL:
    """``L`` with this module's C signatures declared (any build of the library has the symbols)."""
    P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    L.qbi16_isa.restype = INT
    L.qbi16_supported.argtypes = [INT, I64, I64, I64]
    L.qbi16_supported.restype = INT
    L.qbi16_set_gemm_min_m.argtypes = [INT, I64]
    L.qbi16_set_gemm_min_m.restype = None
    L.qbi16_gemm_min_m.argtypes = [INT]
    L.qbi16_gemm_min_m.restype = I64
    L.qbi16_linear8.argtypes = [INT, P, P, I64, I64, P, I64, P, P, INT, I64]
    L.qbi16_linear8.restype = I64
    L.qbi16_packed_bytes.argtypes = [I64, I64]
    L.qbi16_packed_bytes.restype = I64
    L.qbi16_pack.argtypes = [P, I64, I64, P]
    L.qbi16_pack.restype = None
    L.qbi16_linear8_packed.argtypes = [P, P, I64, I64, P, I64, P, P, INT, I64]
    L.qbi16_linear8_packed.restype = I64
    L.qbi16_linear8_packed_group.argtypes = [ctypes.POINTER(QI16Member), I64, I64, P, I64, P, INT, I64]
    L.qbi16_linear8_packed_group.restype = I64
    L.qbi16_group_regions.argtypes = []
    L.qbi16_group_regions.restype = I64
    return L


class QI16Member(ctypes.Structure):
    """Mirror of ``struct QI16Member`` in int16_compute.cpp: one member of a group call."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("N", ctypes.c_int64),
    ]


@functools.cache
def _lib() -> tuple[ctypes.CDLL, int] | None:
    """(the kernel library, the kernel width to run), or None: no library, or the "generic" build (a
    forced portable variant stands for a CPU without AVX2). A forced "avx2" build runs the AVX2 kernels."""
    L = _build.load()
    variant = _build.cpu_variant()
    if L is None or variant == "generic":
        return None
    declare(L)
    isa = int(L.qbi16_isa())
    if variant == "avx2":
        isa = min(isa, ISA_AVX2)
    return (L, isa) if isa >= ISA_AVX2 else None


# Whether the AVX512-VNNI width makes and uses the packed copy of int8 codes (False: the canonical kernels
# read the codes, no extra memory). The copy is the int8 weight's size again (n rounded up to 16, k to 32)
# per layer run in this mode.
PACKING = True


def _packer() -> tuple | None:
    lib = _lib()
    return None if lib is None else (lib[0].qbi16_packed_bytes, lib[0].qbi16_pack)


# The copies, keyed per codes tensor (address, version, shape, object: ``_packed.PackedCache``).
_CACHE = PackedCache(_packer)


def packs() -> bool:
    """Whether int8-weight calls run on the packed copy here (the AVX512-VNNI width, :data:`PACKING` on)."""
    lib = _lib()
    return PACKING and lib is not None and lib[1] == ISA_AVX512_VNNI


def faster_than_fp32() -> bool:
    """Whether this machine's int16 kernels beat the exact fp32 int8 kernel (so "auto" may pick them): the
    AVX-512 widths do (from M = 64 canonical, at every M packed); the AVX2 width measured 0.84-1.15x of the
    AVX2 fp32 kernel at M = 1..128 (0.84-0.87x at M = 1; 1 thread, MiniLM shapes and 4096^2, an AVX2 build
    on a Zen 4), no faster, so there "auto" keeps fp32, which is exact."""
    lib = _lib()
    return lib is not None and lib[1] > ISA_AVX2


def packed_weight(codes: Tensor, n: int, k: int) -> Tensor | None:
    """The panel-packed copy of ``codes`` [n, k] for ``qbi16_linear8_packed`` (made on first use; n rounded
    up to 16, k to 32), or None: packing off, no library, or an inference tensor (no version counter to see
    an in-place write by: the canonical kernels read it instead)."""
    return _CACHE.get(codes, n, k) if PACKING else None


def packed_nbytes() -> int:
    """Bytes held by the packed copies alive now (each is freed with its weight)."""
    return _CACHE.nbytes()


def _block() -> int:
    """The activation block the kernel quantizes with (0: one scale per row)."""
    return 0 if ref.INT16_BLOCK is None else int(ref.INT16_BLOCK)


def set_gemm_min_m(m: int, isa: int | None = None) -> int:
    """Rows of x from which the GEMM kernel runs at width ``isa`` (default: this CPU's); returns the old
    value (a tuning knob for tests and benchmarks)."""
    lib = _lib()
    if lib is None:
        return 0
    L, own = lib
    isa = own if isa is None else isa
    old = int(L.qbi16_gemm_min_m(isa))
    L.qbi16_set_gemm_min_m(isa, int(m))
    return old


def has_fast_kernel(family: str, ints: Mapping[str, int]) -> bool:
    """Whether a layer of ``family`` with these op ints runs an int16 kernel here (int8 weights only)."""
    lib = _lib()
    if lib is None or family != "int8":
        return False
    L, isa = lib
    return bool(L.qbi16_supported(isa, int(ints["out_features"]), int(ints["in_features"]), _block()))


def linear8(
    L: ctypes.CDLL, isa: int, x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, n: int, k: int
) -> Tensor:
    """y = x @ (codes * scale)^T (+ bias) by the kernels of width ``isa`` in library ``L`` (declared with
    :func:`declare`); rows with NaN/Inf and cases the kernels do not cover through the reference."""

    def reference_rows(xr: Tensor) -> Tensor:
        return ref.int8_linear(xr, codes, scale, bias, n, k, "int16")

    c, s = codes.contiguous(), scale.to(torch.float32).contiguous()
    b = _bias32(bias)
    packed = packed_weight(c, n, k) if isa == ISA_AVX512_VNNI else None

    def kernel(x2: Tensor, m: int, y: Tensor) -> int:
        if packed is not None:
            rc = L.qbi16_linear8_packed(packed.data_ptr(), s.data_ptr(), n, k, x2.data_ptr(), m, _ptr(b),
                                        y.data_ptr(), torch.get_num_threads(), _block())  # fmt: skip
            if rc >= 0:
                return rc
        return L.qbi16_linear8(isa, c.data_ptr(), s.data_ptr(), n, k, x2.data_ptr(), m, _ptr(b), y.data_ptr(),
                               torch.get_num_threads(), _block())  # fmt: skip

    return _run_rows(x, n, k, kernel, reference_rows)


def codebook_linear(
    x: Tensor, codes: Tensor, absmax: Tensor | None, nested_codes: Tensor | None, nested_absmax: Tensor | None,
    nested_offset: Tensor | None, table: Tensor, nested_table: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> Tensor:  # fmt: skip
    """``codebook_linear`` (nf4, fp4) in "int16" compute: the reference (no kernel)."""
    return ref.codebook_linear(x, codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table, bias,
                               out_features, in_features, blocksize, nested_blocksize, "int16")  # fmt: skip


def int4_linear(
    x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, groupsize: int,
) -> Tensor:  # fmt: skip
    """``int4_linear`` in "int16" compute: the reference (no kernel)."""
    return ref.int4_linear(x, codes, scale, zero_point, bias, out_features, in_features, groupsize, "int16")


def int8_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_features: int, in_features: int
) -> Tensor:
    """``int8_linear`` in "int16" compute."""
    lib = _lib()
    if lib is None:
        return ref.int8_linear(x, codes, scale, bias, out_features, in_features, "int16")
    return linear8(*lib, x, codes, scale, bias, out_features, in_features)
