"""CPU kernels of the quantized linear ops (the functions of :mod:`qbackend.kernels.reference`, same names).

Importing this module registers them as the ``"cpu"`` kernels of ``torch.ops.qbackend.*``.

Strategy by the number of rows M of the flattened input (measured on the project's 2-core AVX-512
machines with ``benchmarks/bench_cpu_linear.py``; figures in ``benchmarks/results/cpu_ops.md``):

* M <= ``FUSED_MAX_M``: fused C++ kernels that decode the packed weight in registers and never
  materialise it: a GEMV for M = 1 (one pass over the codes, the block constants, nested ones
  included, decoded inline) and a register-tiled small-M GEMM (2-4 rows of W x up to 8 rows of x).
  On this machine they beat dequantize + MKL up to M = 64..256.
* larger M: each thread dequantizes panels of rows of W (exactly) into a cache-sized buffer and
  multiplies them with torch's own BLAS ``sgemm_`` called single-threaded from C++ (without that
  BLAS: the same panels multiplied with torch.mm from Python).
* CPUs with AVX2 + FMA but no AVX-512 (the "avx2" build): the same fused kernels in 256-bit
  registers (``qlinear_avx2.cpp``, called through :mod:`.avx2`), same coverage and numerics.
* Shapes the fused kernels do not cover (K % 32 != 0, block/group sizes that are not powers of two
  >= 32), larger M on AVX2, and CPUs without AVX2: the same exact dequantization (scalar) + BLAS path.
  Without the C++ library at all (no compiler): the pure-torch reference, with a warning.

All paths compute in fp32 and return x's dtype. The ``*_grad_input`` functions compute
``grad_y @ W`` with the panel scheme, so no full float weight is ever held.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .. import ops
from .. import reference as ref
from . import _build, finite
from . import avx2 as _avx2
from . import compute as _compute
from . import fast_path as _fast_path
from . import w8a8 as _w8a8
from ._tensors import bias32 as _bias32
from ._tensors import contig as _contig
from ._tensors import out as _out
from ._tensors import ptr as _ptr
from ._tensors import x2d as _x2d

# Fused kernels up to this many rows; above, dequantized panels + sgemm (measured on one core: the
# fused kernels win at M = 64, tie around M = 256; MKL's cache blocking wins for prefill-sized M).
FUSED_MAX_M = 128
FUSED_MAX_M_INT8 = 128
# Elements of W per dequantized panel (per thread): 32 x 4096 fp32 = 512 KiB, half a core's L2.
PANEL_ELEMS = 32 * 4096
# Flat block indices are int32 inside the kernel.
_MAX_BLOCKS = 2**31 - 64

_force_portable = False  # tests flip this to run what a CPU without AVX-512 runs (scalar dequant + BLAS)


def lib() -> ctypes.CDLL | None:
    """The loaded C++ library, or None (then every op runs the pure-torch reference)."""
    return _build.load()


def packed_nbytes() -> int:
    """Bytes held now by the kernel-layout weight copies (W8A8, int8 weights in "int16"), made on first use
    beside the canonical codes and freed with them: memory on top of the model's own tensors."""
    from . import int16_compute

    return _w8a8.packed_nbytes() + int16_compute.packed_nbytes()


# The kernel descriptor holds only pointers and sizes, so one built for the same pointers and sizes
# is valid whatever tensors now live there: cache them (saves microseconds per call at M=1), with
# what depends on the descriptor alone: its ctypes reference and whether the fused kernels take it.
_qw4_cache: dict[tuple, _build.QW4] = {}


def _qw4(key: tuple, make) -> _build.QW4:
    q = _qw4_cache.get(key)
    if q is None:
        if len(_qw4_cache) > 1024:
            _qw4_cache.clear()
        q = make()
        q.ref = ctypes.byref(q)
        q.fast_ok = bool(lib().qb4_fast_ok(q.ref))
        _qw4_cache[key] = q
    return q


# Panels of the Python-loop fallback (and the grad-input ops): bigger, since each is a parallel region.
LOOP_PANEL_ELEMS = 256 * 4096


def _panel_rows(k: int, n: int, elems: int | None = None) -> int:
    return max(8, min(n, (elems or PANEL_ELEMS) // max(k, 1) // 8 * 8))


def _panel_linear(x2: Tensor, n: int, k: int, bias: Tensor | None, dequant) -> Tensor:
    """y = x2 @ W^T (+ bias) with W dequantized panel by panel into one reused buffer."""
    m = x2.shape[0]
    p = _panel_rows(k, n, LOOP_PANEL_ELEMS)
    buf = torch.empty(p, k, dtype=torch.float32)
    yt = torch.empty(n, m, dtype=torch.float32)  # y^T: each panel's result is a contiguous slab
    xt = x2.t()
    for n0 in range(0, n, p):
        n1 = min(n, n0 + p)
        w = buf[: n1 - n0]
        dequant(n0, n1, w)
        torch.mm(w, xt, out=yt[n0:n1])
    y = yt.t()
    if bias is not None:
        y = y + bias
    return y.contiguous()


def _panel_grad(g2: Tensor, n: int, k: int, dequant) -> Tensor:
    """grad_x = g2 @ W ([M, N] -> [M, K]) accumulated over panels of rows of W."""
    m = g2.shape[0]
    p = _panel_rows(k, n, LOOP_PANEL_ELEMS)
    buf = torch.empty(p, k, dtype=torch.float32)
    gx = torch.zeros(m, k, dtype=torch.float32)
    for n0 in range(0, n, p):
        n1 = min(n, n0 + p)
        w = buf[: n1 - n0]
        dequant(n0, n1, w)
        gx.addmm_(g2[:, n0:n1], w)
    return gx


# ---- 4-bit (codebook and int4) -----------------------------------------------------------------


def _qw4_codebook(codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table, n, k, bs, nbs):
    keep = _contig((codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table))
    ptrs = tuple(_ptr(t) for t in keep)
    c, a, nc, na, no, tb, nt = ptrs

    def make() -> _build.QW4:
        return _build.QW4(codes=c, absmax=a, ncodes=nc, nabsmax=na, ntable=nt, table=tb, scale=None, zp=None,
                          noffset=no, layout=_build.CODEBOOK, N=n, K=k, bs=bs, nbs=nbs, G=0)  # fmt: skip

    return _qw4((_build.CODEBOOK, *ptrs, n, k, bs, nbs), make), keep


def _qw4_int4(codes, scale, zero_point, n, k, g):
    keep = _contig((codes, scale, zero_point))
    ptrs = tuple(_ptr(t) for t in keep)
    c, s, z = ptrs

    def make() -> _build.QW4:
        return _build.QW4(codes=c, absmax=None, ncodes=None, nabsmax=None, ntable=None, table=None, scale=s, zp=z,
                          noffset=None, layout=_build.INT4, N=n, K=k, bs=g, nbs=0, G=-(-k // g))  # fmt: skip

    return _qw4((_build.INT4, *ptrs, n, k, g), make), keep


def _linear4(L, q, x: Tensor, bias: Tensor | None, n: int, k: int) -> Tensor:
    x2 = _x2d(x, k)
    m = x2.shape[0]
    if m == 0:
        return _out(x2.new_empty(0, n), x, n)
    b = _bias32(bias)
    nt = torch.get_num_threads()
    if m <= FUSED_MAX_M and q.fast_ok and not _force_portable:
        y = torch.empty(m, n, dtype=torch.float32)
        if L.qb4_linear(q.ref, x2.data_ptr(), m, None if b is None else b.data_ptr(), y.data_ptr(), nt, 0) == 0:
            return _out(y, x, n)
    elif m <= FUSED_MAX_M and not _force_portable:
        y = _avx2.linear4(L, q, x2, b, n, nt)
        if y is not None:
            return _out(y, x, n)

    if _build.has_blas():
        y = torch.empty(m, n, dtype=torch.float32)
        L.qb4_linear_panel(ctypes.byref(q), x2.data_ptr(), m, _ptr(b), y.data_ptr(), nt, _panel_rows(k, n),
                           int(_force_portable))  # fmt: skip
        return _out(y, x, n)

    def dq(n0: int, n1: int, w: Tensor) -> None:
        L.qb4_dequant(ctypes.byref(q), n0, n1, w.data_ptr(), nt, int(_force_portable))

    return _out(_panel_linear(x2, n, k, b, dq), x, n)


def _grad_partials(L, g2: Tensor, n: int, k: int, run) -> Tensor:
    """grad_x from the C++ panel kernel: per-thread partial sums, added here."""
    nt = torch.get_num_threads()
    p = _panel_rows(k, n)
    parts = torch.zeros(L.qb_panel_threads(n, p, nt), g2.shape[0], k, dtype=torch.float32)
    run(parts, nt, p)
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def _grad4(L, q, g: Tensor, n: int, k: int) -> Tensor:
    g2 = _x2d(g, n)
    nt = torch.get_num_threads()
    if g2.shape[0] == 0:
        gx = g2.new_zeros(0, k)
    elif _build.has_blas():

        def run(parts: Tensor, nt: int, p: int) -> None:
            L.qb4_grad_panel(ctypes.byref(q), g2.data_ptr(), g2.shape[0], parts.data_ptr(), nt, p,
                             int(_force_portable))  # fmt: skip

        gx = _grad_partials(L, g2, n, k, run)
    else:

        def dq(n0: int, n1: int, w: Tensor) -> None:
            L.qb4_dequant(ctypes.byref(q), n0, n1, w.data_ptr(), nt, int(_force_portable))

        gx = _panel_grad(g2, n, k, dq)
    return gx.reshape(*g.shape[:-1], k).to(g.dtype)


def _blocks_ok(n: int, k: int, bs: int) -> bool:
    return -(-n * k // bs) < _MAX_BLOCKS and n * k < 2**62


def codebook_linear(
    x: Tensor, codes: Tensor, absmax: Tensor | None, nested_codes: Tensor | None, nested_absmax: Tensor | None,
    nested_offset: Tensor | None, table: Tensor, nested_table: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int, compute: str = "fp32",
) -> Tensor:  # fmt: skip
    """CPU ``codebook_linear`` (nf4, fp4) (see module docstring for the strategy)."""
    if compute != "fp32":
        return _compute.codebook_linear(x, codes, absmax, nested_codes, nested_absmax, nested_offset, table,
                                        nested_table, bias, out_features, in_features, blocksize, nested_blocksize,
                                        compute)  # fmt: skip
    L = lib()
    if L is None or not _blocks_ok(out_features, in_features, blocksize):
        return ref.codebook_linear(x, codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
                                    bias, out_features, in_features, blocksize, nested_blocksize)  # fmt: skip
    q, _keep = _qw4_codebook(codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
                             out_features, in_features, blocksize, nested_blocksize)  # fmt: skip
    return _linear4(L, q, x, bias, out_features, in_features)


def codebook_linear_grad_input(
    grad_y: Tensor, codes: Tensor, absmax: Tensor | None, nested_codes: Tensor | None,
    nested_absmax: Tensor | None, nested_offset: Tensor | None, table: Tensor, nested_table: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> Tensor:  # fmt: skip
    """CPU ``grad_y @ W`` for an NF4/FP4 weight, dequantized panel by panel."""
    L = lib()
    if L is None or not _blocks_ok(out_features, in_features, blocksize):
        return ref.codebook_linear_grad_input(grad_y, codes, absmax, nested_codes, nested_absmax, nested_offset,
                                              table, nested_table, out_features, in_features, blocksize,
                                              nested_blocksize)  # fmt: skip
    q, _keep = _qw4_codebook(codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
                             out_features, in_features, blocksize, nested_blocksize)  # fmt: skip
    return _grad4(L, q, grad_y, out_features, in_features)


def int4_linear(
    x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, groupsize: int, compute: str = "fp32",
) -> Tensor:  # fmt: skip
    """CPU ``int4_linear``."""
    if compute != "fp32":
        return _compute.int4_linear(x, codes, scale, zero_point, bias, out_features, in_features, groupsize, compute)
    L = lib()
    if L is None:
        return ref.int4_linear(x, codes, scale, zero_point, bias, out_features, in_features, groupsize)
    q, _keep = _qw4_int4(codes, scale, zero_point, out_features, in_features, groupsize)
    return _linear4(L, q, x, bias, out_features, in_features)


def int4_linear_grad_input(
    grad_y: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor | None,
    out_features: int, in_features: int, groupsize: int,
) -> Tensor:  # fmt: skip
    """CPU ``grad_y @ W`` for an int4 weight."""
    L = lib()
    if L is None:
        return ref.int4_linear_grad_input(grad_y, codes, scale, zero_point, out_features, in_features, groupsize)
    q, _keep = _qw4_int4(codes, scale, zero_point, out_features, in_features, groupsize)
    return _grad4(L, q, grad_y, out_features, in_features)


# ---- int8 --------------------------------------------------------------------------------------


def _int8_y(L, x2: Tensor, codes: Tensor, scale: Tensor, b: Tensor | None, n: int, k: int) -> Tensor:
    """fp32 [M, N] = x2 @ (codes * scale)^T (+ b)."""
    m = x2.shape[0]
    nt = torch.get_num_threads()
    if m <= FUSED_MAX_M_INT8 and not _force_portable and L.qb_has_avx512():
        y = torch.empty(m, n, dtype=torch.float32)
        if L.qb8_linear(codes.data_ptr(), scale.data_ptr(), n, k, x2.data_ptr(), m, _ptr(b), y.data_ptr(), nt, 0) == 0:
            return y
    elif m <= FUSED_MAX_M_INT8 and not _force_portable:
        y = _avx2.linear8(L, codes, scale, x2, b, n, k, nt)
        if y is not None:
            return y

    if _build.has_blas():
        y = torch.empty(m, n, dtype=torch.float32)
        L.qb8_linear_panel(codes.data_ptr(), scale.data_ptr(), n, k, x2.data_ptr(), m, _ptr(b), y.data_ptr(), nt,
                           _panel_rows(k, n))  # fmt: skip
        return y

    def dq(n0: int, n1: int, w: Tensor) -> None:
        L.qb8_dequant(codes.data_ptr(), scale.data_ptr(), k, n0, n1, w.data_ptr(), nt)

    return _panel_linear(x2, n, k, b, dq)


def int8_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_features: int, in_features: int,
    compute: str = "fp32",
) -> Tensor:  # fmt: skip
    """CPU ``int8_linear``."""
    if compute != "fp32":
        return _compute.int8_linear(x, codes, scale, bias, out_features, in_features, compute)
    L = lib()
    if L is None:
        return ref.int8_linear(x, codes, scale, bias, out_features, in_features)
    x2 = _x2d(x, in_features)
    if x2.shape[0] == 0:
        return _out(x2.new_empty(0, out_features), x, out_features)
    y = _int8_y(L, x2, codes.contiguous(), scale.contiguous(), _bias32(bias), out_features, in_features)
    return _out(y, x, out_features)


def int8_linear_grad_input(grad_y: Tensor, codes: Tensor, scale: Tensor, out_features: int, in_features: int):
    """CPU ``grad_y @ W`` for an int8 per-channel weight."""
    L = lib()
    if L is None:
        return ref.int8_linear_grad_input(grad_y, codes, scale, out_features, in_features)
    codes, scale = codes.contiguous(), scale.contiguous()
    g2 = _x2d(grad_y, out_features)
    nt = torch.get_num_threads()
    if g2.shape[0] == 0:
        gx = g2.new_zeros(0, in_features)
    elif _build.has_blas():

        def run(parts: Tensor, nt: int, p: int) -> None:
            L.qb8_grad_panel(codes.data_ptr(), scale.data_ptr(), out_features, in_features, g2.data_ptr(),
                             g2.shape[0], parts.data_ptr(), nt, p)  # fmt: skip

        gx = _grad_partials(L, g2, out_features, in_features, run)
    else:

        def dq(n0: int, n1: int, w: Tensor) -> None:
            L.qb8_dequant(codes.data_ptr(), scale.data_ptr(), in_features, n0, n1, w.data_ptr(), nt)

        gx = _panel_grad(g2, out_features, in_features, dq)
    return gx.reshape(*grad_y.shape[:-1], in_features).to(grad_y.dtype)


def w8a8_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, act_scale: Tensor | None,
    out_features: int, in_features: int,
) -> Tensor:  # fmt: skip
    """CPU ``w8a8_linear``: the exact int8 GEMM of :mod:`.w8a8` (AVX512-VNNI) where it runs.

    Elsewhere: activations rounded to int8 exactly as the reference, then the fp32 int8-weight kernel
    (integer products summed in fp32: exact up to 2^24 per partial sum).
    """
    y = _w8a8.w8a8_linear(x, codes, scale, bias, act_scale, out_features, in_features)
    if y is not None:
        return y
    L = lib()
    if L is None:
        return ref.w8a8_linear(x, codes, scale, bias, act_scale, out_features, in_features)
    xf = _x2d(x, in_features)
    if act_scale is None:
        s_x = xf.abs().amax(dim=1, keepdim=True) / 127.0
    else:
        s_x = act_scale.float().reshape(1, 1).expand(xf.shape[0], 1)
    safe = torch.where(s_x > 0, s_x, torch.ones_like(s_x))
    xq = torch.clamp(torch.round(xf / safe), -127, 127).contiguous()
    ones = torch.ones_like(scale, dtype=torch.float32)
    acc = _int8_y(L, xq, codes.contiguous(), ones, None, out_features, in_features)
    y = acc * s_x * scale.float().view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)


# The "cpu" kernels of the ops, found by name (see ops.register_kernels).
ops.register_kernels("cpu", lambda name: finite.wrap(name, globals().get(name)))
# ... and their prepared forms for small calls (module forwards, compiled code): see fast_path.
ops.register_fast_kernels("cpu", _fast_path.find)
