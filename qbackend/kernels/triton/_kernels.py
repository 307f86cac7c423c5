"""The @triton.jit kernels (no launch logic here).

This module is loaded twice when needed: once normally (compiled kernels for CUDA tensors) and once
with ``TRITON_INTERPRET=1`` for CPU tensors (see ``_runtime.kernels_for``), so it must stay free of
module state.

Compile-time specialisation (every constexpr below gives its own compiled kernel):

* ``LAYOUT`` (the kernel stem, see :mod:`qbackend.kernels`): 0 = ``codebook`` (nf4, fp4:
  ``table[code] * absmax[block]``), 1 = ``int4`` per group along K (``(code - zp) * scale``),
  2 = ``int8`` per output channel (scale applied after the reduction). Named in ``linear.py``.
* ``BS``: codebook block size / int4 group size; ``NBS``: nested block size; ``NESTED``: the block
  constants are 8-bit codes decoded in the kernel as ``ntab[q] * nabs[i // NBS] + offset``.
* ``PAIRS``: K (and the block size) is even, so each row of the flat nibble stream starts on a byte
  boundary: one byte load gives the codes of columns (2j, 2j+1), which multiply the even/odd
  activations. Otherwise the generic path computes the flat element index ``e = n*K + k`` and picks
  its nibble.
* ``ALIGNED``: every K tile lies inside one constant block per row, so the block constants are
  loaded once per row and tile instead of per element.

All arithmetic is fp32 after the loads (the interpreter computes bf16 wrongly, and the reference is
fp32). Tensor-core paths cast the decoded tile to ``DOT_DTYPE`` right before ``tl.dot``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# helpers. Only core builtins and our own jit functions are used (no tl.zeros / tl.sum / tl.max /
# tl.cdiv, which are @jit functions of triton's standard library): an interpreted copy of this
# module then works even when triton itself was imported without TRITON_INTERPRET.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles share their weight column tiles while in L2."""
    num_m = _cdiv(M, BLOCK_M)
    num_n = _cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    return pid_m, pid_n


@triton.jit
def _const_idx(n, k, K, G, LAYOUT: tl.constexpr, BS: tl.constexpr):
    """Index of the block constant of element (n, k)."""
    if LAYOUT == 0:
        idx = (n * K + k) // BS  # codebook blocks run over the flattened weight (may straddle rows)
    else:
        idx = n * G + k // BS  # int4 groups run along K inside a row
    return idx


@triton.jit
def _block_consts(
    idx, cmask, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, ntab_ptr,
    NESTED: tl.constexpr, NBS: tl.constexpr, HAS_ZP: tl.constexpr,
):  # fmt: skip
    """fp32 scale (and zero point) of block ``idx``; nested constants are decoded right here."""
    if NESTED:
        q = tl.load(ncode_ptr + idx, mask=cmask, other=0).to(tl.int32)
        a2 = tl.load(nabs_ptr + idx // NBS, mask=cmask, other=0.0).to(tl.float32)
        s = tl.load(ntab_ptr + q).to(tl.float32) * a2 + tl.load(noff_ptr).to(tl.float32)
    else:
        s = tl.load(s_ptr + idx, mask=cmask, other=0.0).to(tl.float32)
    if HAS_ZP:
        zp = tl.load(zp_ptr + idx, mask=cmask, other=0).to(tl.float32)
    else:
        zp = s  # placeholder, unused (symmetric int4 subtracts the constant 8)
    return s, zp


@triton.jit
def _decode(code, s, zp, tab_ptr, LAYOUT: tl.constexpr, HAS_ZP: tl.constexpr):
    """fp32 weight of 4-bit ``code`` (int32 0..15) given its block constants."""
    if LAYOUT == 0:
        w = tl.load(tab_ptr + code) * s
    else:
        if HAS_ZP:
            w = (code.to(tl.float32) - zp) * s
        else:
            w = (code - 8).to(tl.float32) * s
    return w


@triton.jit
def _decode_pairs(
    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
    n, kp, k0, nmask, mask, K, KH, G,
    LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    NESTED: tl.constexpr, HAS_ZP: tl.constexpr,
):  # fmt: skip
    """Weights of columns (2*kp, 2*kp+1) of rows ``n`` (K even, KH = K // 2 bytes per row).

    Shapes broadcast from n and kp. ``k0`` is the tile's first column (aligned constants).
    """
    b = tl.load(codes_ptr + n * KH + kp, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
    hi = b >> 4  # first element of the pair sits in the high nibble (bitsandbytes order)
    lo = b & 15
    if ALIGNED:
        idx = _const_idx(n, k0, K, G, LAYOUT, BS)
        s, zp = _block_consts(idx, nmask, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, ntab_ptr, NESTED, NBS, HAS_ZP)
    else:
        # BS is even on this path, so both elements of a pair share a block.
        idx = _const_idx(n, 2 * kp, K, G, LAYOUT, BS)
        s, zp = _block_consts(idx, mask, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, ntab_ptr, NESTED, NBS, HAS_ZP)
    return _decode(hi, s, zp, tab_ptr, LAYOUT, HAS_ZP), _decode(lo, s, zp, tab_ptr, LAYOUT, HAS_ZP)


@triton.jit
def _decode_elems(
    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
    n, k, k0, nmask, mask, K, G,
    LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    NESTED: tl.constexpr, HAS_ZP: tl.constexpr,
):  # fmt: skip
    """Weights of elements (n, k) for any K: the flat index picks byte and nibble."""
    e = n * K + k
    b = tl.load(codes_ptr + (e >> 1), mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
    code = (b >> (4 - 4 * (e & 1))) & 15
    if ALIGNED:
        idx = _const_idx(n, k0, K, G, LAYOUT, BS)
        s, zp = _block_consts(idx, nmask, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, ntab_ptr, NESTED, NBS, HAS_ZP)
    else:
        idx = _const_idx(n, k, K, G, LAYOUT, BS)
        s, zp = _block_consts(idx, mask, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, ntab_ptr, NESTED, NBS, HAS_ZP)
    return _decode(code, s, zp, tab_ptr, LAYOUT, HAS_ZP)


@triton.jit
def _decode_tile(
    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
    n, offs_n, k, k0, nmask, mask, K, G,
    LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    NESTED: tl.constexpr, HAS_ZP: tl.constexpr,
):  # fmt: skip
    """fp32 weights of the tile rows ``n`` x columns ``k`` (1-D each) for any layout and K; int8 is
    scaled per channel here (``offs_n``: the rows as the scale is indexed)."""
    if LAYOUT == 2:
        q = tl.load(codes_ptr + n[:, None] * K + k[None, :], mask=mask, other=0).to(tl.float32)
        w = q * tl.load(s_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[:, None]
    else:
        w = _decode_elems(
            codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
            n[:, None], k[None, :], k0, nmask[:, None], mask, K, G, LAYOUT, ALIGNED, BS, NBS, NESTED, HAS_ZP,
        )  # fmt: skip
    return w


# ---------------------------------------------------------------------------------------------
# weight-only forward: GEMV (M = 1 typically; one program per (N tile, K split, row)), no tl.dot
# ---------------------------------------------------------------------------------------------


@triton.jit
def wo_gemv_kernel(
    x_ptr, out_ptr, bias_ptr,
    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
    N, K, KH, G, stride_xm, stride_om, K_SPLIT, KP_SPLIT,
    LAYOUT: tl.constexpr, PAIRS: tl.constexpr, ALIGNED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    NESTED: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    n = offs_n
    if IDX64:
        n = n.to(tl.int64)
    x_row = x_ptr + m * stride_xm
    acc = tl.full([BLOCK_N], 0, tl.float32)
    if PAIRS:
        # Loop in byte units (KH, KP_SPLIT are 16-divisible for aligned shapes -> 128-bit loads).
        kp_lo = pid_k * KP_SPLIT
        kp_hi = tl.minimum(kp_lo + KP_SPLIT, KH)
        for kp0 in range(kp_lo, kp_hi, BLOCK_K // 2):
            kp = kp0 + tl.arange(0, BLOCK_K // 2)
            k_mask = kp < kp_hi
            offs_k = 2 * kp0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_row + offs_k, mask=offs_k < 2 * kp_hi, other=0.0, eviction_policy="evict_last")
            # Contiguous load, then de-interleave in registers: even columns meet high nibbles.
            xe, xo = tl.split(tl.reshape(xv.to(tl.float32), [BLOCK_K // 2, 2]))
            w_hi, w_lo = _decode_pairs(
                codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
                n[:, None], kp[None, :], 2 * kp0, n_mask[:, None], n_mask[:, None] & k_mask[None, :], K, KH, G,
                LAYOUT, ALIGNED, BS, NBS, NESTED, HAS_ZP,
            )  # fmt: skip
            acc += tl.reduce(w_hi * xe[None, :] + w_lo * xo[None, :], 1, _add)
    else:
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            xv = tl.load(x_row + offs_k, mask=k_mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
            mask = n_mask[:, None] & k_mask[None, :]
            if LAYOUT == 2:
                w = tl.load(
                    codes_ptr + n[:, None] * K + offs_k[None, :], mask=mask, other=0, eviction_policy="evict_first"
                ).to(tl.float32)
            else:
                w = _decode_elems(
                    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
                    n[:, None], offs_k[None, :], k0, n_mask[:, None], mask, K, G,
                    LAYOUT, ALIGNED, BS, NBS, NESTED, HAS_ZP,
                )  # fmt: skip
            acc += tl.reduce(w * xv[None, :], 1, _add)
    if LAYOUT == 2:
        # Per-channel scale is constant along K: one multiply per output instead of per weight.
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, b, 0.0)  # only the first K split adds the bias
    out_ptrs = out_ptr + m * stride_om + offs_n
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=n_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


# ---------------------------------------------------------------------------------------------
# weight-only forward, wide GEMV for M <= 4 (decode): each K tile spans several constant blocks
# ---------------------------------------------------------------------------------------------

# 2**23 as fp32 bits: OR-ing a small non-negative integer c into the mantissa gives the float
# 2**23 + c exactly, so ``bits - 2**23`` converts c with full-rate integer/FP ops instead of the
# quarter-rate int->float conversion (which bounds a 4-bit GEMV per byte read).
_MAGIC_BITS = tl.constexpr(0x4B000000)


@triton.jit
def _small_int_f32(c, minus: tl.constexpr):
    """float(c) - minus for int32 c in [0, 2**22), exact."""
    return (c | _MAGIC_BITS).to(tl.float32, bitcast=True) - (8388608.0 + minus)


@triton.jit
def _lut16(c, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15):
    """t[c] for 4-bit codes by a select tree over the code bits: no memory access per element."""
    b0 = (c & 1) != 0
    b1 = (c & 2) != 0
    b2 = (c & 4) != 0
    b3 = (c & 8) != 0
    a0 = tl.where(b0, t1, t0)
    a1 = tl.where(b0, t3, t2)
    a2 = tl.where(b0, t5, t4)
    a3 = tl.where(b0, t7, t6)
    a4 = tl.where(b0, t9, t8)
    a5 = tl.where(b0, t11, t10)
    a6 = tl.where(b0, t13, t12)
    a7 = tl.where(b0, t15, t14)
    c0 = tl.where(b1, a1, a0)
    c1 = tl.where(b1, a3, a2)
    c2 = tl.where(b1, a5, a4)
    c3 = tl.where(b1, a7, a6)
    d0 = tl.where(b2, c1, c0)
    d1 = tl.where(b2, c3, c2)
    return tl.where(b3, d1, d0)


@triton.jit
def wo_gemv_wide_kernel(
    x_ptr, out_ptr, bias_ptr,
    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr, ptab_ptr,
    M, N, K, KH, G, stride_xm, stride_om, K_SPLIT, KP_SPLIT,
    LAYOUT: tl.constexpr, BS: tl.constexpr, SUB: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr,
    HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, IDX64: tl.constexpr,
    LUT: tl.constexpr, SIGNED: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[m, n] for BLOCK_M rows of x at once (the weight tile is decoded once and used for each row).

    4-bit layouts (K even, power-of-two block size; codebook blocks row-local, i.e. K % BS == 0):
    the byte tile is [BLOCK_N, NB, SUB // 2] with ``SUB = min(BS, BLOCK_K)`` columns per slab, so
    each slab lies in one constant block and its constants form a [BLOCK_N, NB] tile. Each slab is
    reduced with the raw code values (table entry or code - zero point), then scaled once per block.
    ``LUT`` (codebook): how table entries are found: 0 = gather from the 16-entry table in global
    memory (L1), 1 = select tree over the code bits on 16 scalars, 2 = ``tl.gather`` on a register copy,
    3 = one 8-byte gather per code byte from ``ptab`` [256, 2] = (table[b >> 4], table[b & 15]): half
    the lookups and no nibble extraction.
    int8 (LAYOUT 2): a plain [BLOCK_N, BLOCK_K] tile, per-channel scale after the reduction.
    ``K_SPLIT`` is a multiple of BLOCK_K, so every tile starts on a slab boundary; the 4-bit loop
    runs in bytes (``KP_SPLIT = K_SPLIT // 2``) so the compiler sees 16-byte aligned row segments.
    ``PREFETCH`` (4-bit): the next tile's code bytes are loaded before the current tile is decoded,
    so two tiles per program are in flight (the loop is not software-pipelined by the compiler).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    n = offs_n
    if IDX64:
        n = n.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    if LAYOUT == 2:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            b = tl.load(
                codes_ptr + n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0,
                eviction_policy="evict_first",
            )  # fmt: skip
            if SIGNED:
                # int8 -> (q + 128) as a byte, then the exact magic-number conversion.
                w = _small_int_f32(b.to(tl.uint8, bitcast=True).to(tl.int32) ^ 128, 128.0)
            else:
                w = _small_int_f32(b.to(tl.int32), 0.0)
            for mi in tl.static_range(BLOCK_M):
                xm = k_mask & ((offs_k * 0 + (m0 + mi)) < M)
                x_row = x_ptr + (m0 + mi).to(tl.int64) * stride_xm
                xv = tl.load(x_row + offs_k, mask=xm, other=0.0, eviction_policy="evict_last").to(tl.float32)
                part = tl.reduce(w * xv[None, :], 1, _add)
                acc += tl.where(rows[:, None] == m0 + mi, part[None, :], 0.0)
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    else:
        if LAYOUT == 0:
            if LUT == 1:
                t0 = tl.load(tab_ptr + 0).to(tl.float32)
                t1 = tl.load(tab_ptr + 1).to(tl.float32)
                t2 = tl.load(tab_ptr + 2).to(tl.float32)
                t3 = tl.load(tab_ptr + 3).to(tl.float32)
                t4 = tl.load(tab_ptr + 4).to(tl.float32)
                t5 = tl.load(tab_ptr + 5).to(tl.float32)
                t6 = tl.load(tab_ptr + 6).to(tl.float32)
                t7 = tl.load(tab_ptr + 7).to(tl.float32)
                t8 = tl.load(tab_ptr + 8).to(tl.float32)
                t9 = tl.load(tab_ptr + 9).to(tl.float32)
                t10 = tl.load(tab_ptr + 10).to(tl.float32)
                t11 = tl.load(tab_ptr + 11).to(tl.float32)
                t12 = tl.load(tab_ptr + 12).to(tl.float32)
                t13 = tl.load(tab_ptr + 13).to(tl.float32)
                t14 = tl.load(tab_ptr + 14).to(tl.float32)
                t15 = tl.load(tab_ptr + 15).to(tl.float32)
            if LUT == 2:
                tab = tl.load(tab_ptr + tl.arange(0, 16)).to(tl.float32)
        j = tl.arange(0, BLOCK_K // SUB)
        i = tl.arange(0, SUB // 2)
        n3 = n[:, None, None]
        nm2 = n_mask[:, None]
        kp_lo = pid_k * KP_SPLIT
        kp_hi = tl.minimum(kp_lo + KP_SPLIT, KH)
        jk = j[:, None] * (SUB // 2) + i[None, :]  # [NB, SUB // 2] byte offsets inside a tile
        if PREFETCH:
            kp_n = kp_lo + jk
            b_next = tl.load(
                codes_ptr + n3 * KH + kp_n[None, :, :], mask=nm2[:, :, None] & (kp_n < kp_hi)[None, :, :], other=0,
                eviction_policy="evict_first",
            )  # fmt: skip
        for kp0 in range(kp_lo, kp_hi, BLOCK_K // 2):
            kp = kp0 + jk
            k_mask = kp < kp_hi
            if PREFETCH:
                b_raw = b_next
                kp_n = kp + BLOCK_K // 2
                b_next = tl.load(
                    codes_ptr + n3 * KH + kp_n[None, :, :], mask=nm2[:, :, None] & (kp_n < kp_hi)[None, :, :],
                    other=0, eviction_policy="evict_first",
                )  # fmt: skip
            else:
                b_raw = tl.load(
                    codes_ptr + n3 * KH + kp[None, :, :], mask=nm2[:, :, None] & k_mask[None, :, :], other=0,
                    eviction_policy="evict_first",
                )  # fmt: skip
            b = b_raw.to(tl.int32)
            hi = b >> 4  # first element of the pair sits in the high nibble (bitsandbytes order)
            lo = b & 15
            if LAYOUT == 0:
                if LUT == 3:
                    # [.., 2] offsets contiguous in the last dim: one 64-bit load per byte.
                    pair = tl.load(ptab_ptr + (2 * b)[:, :, :, None] + tl.arange(0, 2)[None, None, None, :])
                    v_hi, v_lo = tl.split(pair.to(tl.float32))
            kb = 2 * kp0 + j * SUB  # first column of each slab
            cidx = n[:, None] * G + (kb // BS)[None, :]
            cmask = nm2 & (kb < 2 * kp_hi)[None, :]
            s, zp = _block_consts(
                cidx, cmask, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, ntab_ptr, NESTED, NBS, HAS_ZP
            )  # fmt: skip
            if LAYOUT == 0:
                if LUT == 1:
                    v_hi = _lut16(hi, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15)
                    v_lo = _lut16(lo, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15)
                elif LUT == 3:
                    pass  # looked up right after the load
                elif LUT == 2:
                    # tl.gather from the table held as a register tensor (shuffles or shared memory,
                    # 32-bit indices) instead of a 64-bit address per element.
                    tab3 = tl.broadcast_to(tab[None, None, :], [BLOCK_N, BLOCK_K // SUB, 16])
                    v_hi = tl.gather(tab3, hi, 2)
                    v_lo = tl.gather(tab3, lo, 2)
                else:
                    v_hi = tl.load(tab_ptr + hi).to(tl.float32)
                    v_lo = tl.load(tab_ptr + lo).to(tl.float32)
            else:
                if HAS_ZP:
                    v_hi = _small_int_f32(hi, 0.0) - zp[:, :, None]
                    v_lo = _small_int_f32(lo, 0.0) - zp[:, :, None]
                else:
                    v_hi = _small_int_f32(hi, 8.0)
                    v_lo = _small_int_f32(lo, 8.0)
            for mi in tl.static_range(BLOCK_M):
                x_row = x_ptr + (m0 + mi).to(tl.int64) * stride_xm
                xm = k_mask & ((kp * 0 + (m0 + mi)) < M)  # a tensor compare: the interpreter rejects a scalar bool here
                xe = tl.load(x_row + 2 * kp, mask=xm, other=0.0, eviction_policy="evict_last").to(tl.float32)
                xo = tl.load(x_row + 2 * kp + 1, mask=xm, other=0.0, eviction_policy="evict_last").to(tl.float32)
                slab = tl.reduce(v_hi * xe[None, :, :] + v_lo * xo[None, :, :], 2, _add)  # [BLOCK_N, NB]
                part = tl.reduce(slab * s, 1, _add)
                acc += tl.where(rows[:, None] == m0 + mi, part[None, :], 0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]  # only the first K split adds the bias
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    o_mask = (rows < M)[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# ---------------------------------------------------------------------------------------------
# weight-only decode: W [N, K] in the activation dtype, for large M (then cuBLAS runs the GEMM)
# ---------------------------------------------------------------------------------------------


@triton.jit
def wo_decode_kernel(
    out_ptr,
    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
    N, K, KH, G,
    LAYOUT: tl.constexpr, PAIRS: tl.constexpr, ALIGNED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    NESTED: tl.constexpr, HAS_ZP: tl.constexpr, IDX64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    n = offs_n
    if IDX64:
        n = n.to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = n_mask[:, None] & (offs_k < K)[None, :]
    if PAIRS:
        kp = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        w_hi, w_lo = _decode_pairs(
            codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
            n[:, None], kp[None, :], k0, n_mask[:, None], n_mask[:, None] & (kp < KH)[None, :], K, KH, G,
            LAYOUT, ALIGNED, BS, NBS, NESTED, HAS_ZP,
        )  # fmt: skip
        w = tl.reshape(tl.join(w_hi, w_lo), [BLOCK_N, BLOCK_K])  # re-interleave even/odd columns
    else:
        w = _decode_tile(
            codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
            n, offs_n, offs_k, k0, n_mask, mask, K, G, LAYOUT, ALIGNED, BS, NBS, NESTED, HAS_ZP,
        )  # fmt: skip
    tl.store(out_ptr + n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# weight-only forward with tl.dot: small M (M padded to BLOCK_M >= 16, split-K) and large M
# (grouped tile order, SPLIT_K = 1). Same kernel; the launcher picks the specialisation.
# ---------------------------------------------------------------------------------------------


@triton.jit
def wo_dot_kernel(
    x_ptr, out_ptr, bias_ptr,
    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
    M, N, K, KH, G, stride_xm, stride_om, K_SPLIT, KP_SPLIT,
    LAYOUT: tl.constexpr, PAIRS: tl.constexpr, ALIGNED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    NESTED: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    IDX64: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n = offs_n
    if IDX64:
        n = n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
    if PAIRS:
        # Two half-depth dots (even columns x high nibbles, odd x low): the weight tile needs no
        # nibble interleave; the activation tile is loaded contiguously and split in registers.
        kp_lo = pid_k * KP_SPLIT
        kp_hi = tl.minimum(kp_lo + KP_SPLIT, KH)
        for kp0 in range(kp_lo, kp_hi, BLOCK_K // 2):
            kp = kp0 + tl.arange(0, BLOCK_K // 2)
            k_mask = kp < kp_hi
            offs_k = 2 * kp0 + tl.arange(0, BLOCK_K)
            a = tl.load(
                x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < 2 * kp_hi)[None, :], other=0.0,
                eviction_policy="evict_last",
            )  # fmt: skip
            xe, xo = tl.split(tl.reshape(a.to(DOT_DTYPE), [BLOCK_M, BLOCK_K // 2, 2]))
            w_hi, w_lo = _decode_pairs(
                codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
                n[None, :], kp[:, None], 2 * kp0, n_mask[None, :], k_mask[:, None] & n_mask[None, :], K, KH, G,
                LAYOUT, ALIGNED, BS, NBS, NESTED, HAS_ZP,
            )  # fmt: skip
            acc += tl.dot(xe, w_hi.to(DOT_DTYPE), input_precision=DOT_PREC)
            acc += tl.dot(xo, w_lo.to(DOT_DTYPE), input_precision=DOT_PREC)
    else:
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            a = tl.load(
                x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0,
                eviction_policy="evict_last",
            )  # fmt: skip
            w_mask = k_mask[:, None] & n_mask[None, :]
            if LAYOUT == 2:
                w = tl.load(codes_ptr + n[None, :] * K + offs_k[:, None], mask=w_mask, other=0)
            else:
                w = _decode_elems(
                    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
                    n[None, :], offs_k[:, None], k0, n_mask[None, :], w_mask, K, G,
                    LAYOUT, ALIGNED, BS, NBS, NESTED, HAS_ZP,
                )  # fmt: skip
            acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PREC)
    if LAYOUT == 2:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, b, 0.0)[None, :]  # only the first K split adds the bias
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# ---------------------------------------------------------------------------------------------
# weight-only forward with tl.dot, wide K tiles (codebook, small M): each K tile spans several
# constant blocks, their constants decoded once per block and tile
# ---------------------------------------------------------------------------------------------


@triton.jit
def wo_dot_wide_kernel(
    x_ptr, out_ptr, bias_ptr,
    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr, ptab_ptr,
    M, N, K, KH, G, stride_xm, stride_om, K_SPLIT, KP_SPLIT,
    BS: tl.constexpr, SUB: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr, IDX64: tl.constexpr, LUT: tl.constexpr, PREFETCH: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y = x @ W^T for NF4/FP4 codes (K even, power-of-two block size, K % BS == 0: blocks row-local).

    The wide GEMV's decode under tl.dot: the byte tile is [NB, SUB // 2, BLOCK_N] (``SUB = min(BS,
    BLOCK_K)`` columns per slab, so each slab lies in one constant block), the [NB, BLOCK_N] constants
    (nested ones decoded here) are computed once per block instead of once per element or per
    64-column step, and the tile reshapes to [BLOCK_K // 2, BLOCK_N] for two half-depth dots (even
    columns x high nibbles, odd x low). ``LUT``: 0 = table entries gathered from global memory (L1),
    1 = select tree on 16 scalars (no memory access, so nothing for the pipeliner to stage through shared
    memory), 3 = one 8-byte gather per code byte from ``ptab`` [256, 2]. ``K_SPLIT`` is a multiple of BLOCK_K.
    ``PREFETCH``: the next tile's code bytes are loaded before the current tile is decoded.
    """
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n = offs_n
    if IDX64:
        n = n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
    j = tl.arange(0, BLOCK_K // SUB)
    jk = j[:, None] * (SUB // 2) + tl.arange(0, SUB // 2)[None, :]  # [NB, SUB // 2] byte offsets in a tile
    w_rows = codes_ptr + n[None, None, :] * KH
    nm3 = n_mask[None, None, :]
    kp_lo = pid_k * KP_SPLIT
    kp_hi = tl.minimum(kp_lo + KP_SPLIT, KH)
    if LUT == 1:
        t0 = tl.load(tab_ptr + 0).to(tl.float32)
        t1 = tl.load(tab_ptr + 1).to(tl.float32)
        t2 = tl.load(tab_ptr + 2).to(tl.float32)
        t3 = tl.load(tab_ptr + 3).to(tl.float32)
        t4 = tl.load(tab_ptr + 4).to(tl.float32)
        t5 = tl.load(tab_ptr + 5).to(tl.float32)
        t6 = tl.load(tab_ptr + 6).to(tl.float32)
        t7 = tl.load(tab_ptr + 7).to(tl.float32)
        t8 = tl.load(tab_ptr + 8).to(tl.float32)
        t9 = tl.load(tab_ptr + 9).to(tl.float32)
        t10 = tl.load(tab_ptr + 10).to(tl.float32)
        t11 = tl.load(tab_ptr + 11).to(tl.float32)
        t12 = tl.load(tab_ptr + 12).to(tl.float32)
        t13 = tl.load(tab_ptr + 13).to(tl.float32)
        t14 = tl.load(tab_ptr + 14).to(tl.float32)
        t15 = tl.load(tab_ptr + 15).to(tl.float32)
    if PREFETCH:
        kp_n = kp_lo + jk
        b_next = tl.load(
            w_rows + kp_n[:, :, None], mask=nm3 & (kp_n < kp_hi)[:, :, None], other=0, eviction_policy="evict_first"
        )  # fmt: skip
    for kp0 in range(kp_lo, kp_hi, BLOCK_K // 2):
        kp = kp0 + jk
        if PREFETCH:
            b_raw = b_next
            kp_n = kp + BLOCK_K // 2
            b_next = tl.load(
                w_rows + kp_n[:, :, None], mask=nm3 & (kp_n < kp_hi)[:, :, None], other=0,
                eviction_policy="evict_first",
            )  # fmt: skip
        else:
            b_raw = tl.load(
                w_rows + kp[:, :, None], mask=nm3 & (kp < kp_hi)[:, :, None], other=0, eviction_policy="evict_first"
            )  # fmt: skip
        offs_k = 2 * kp0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < 2 * kp_hi)[None, :], other=0.0,
            eviction_policy="evict_last",
        )  # fmt: skip
        xe, xo = tl.split(tl.reshape(a.to(DOT_DTYPE), [BLOCK_M, BLOCK_K // 2, 2]))
        b = b_raw.to(tl.int32)
        if LUT == 3:
            pair = tl.load(ptab_ptr + (2 * b)[:, :, :, None] + tl.arange(0, 2)[None, None, None, :])
            v_hi, v_lo = tl.split(pair.to(tl.float32))
        elif LUT == 1:
            v_hi = _lut16(b >> 4, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15)
            v_lo = _lut16(b & 15, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15)
        else:
            # first element of a pair sits in the high nibble (bitsandbytes order)
            v_hi = tl.load(tab_ptr + (b >> 4)).to(tl.float32)
            v_lo = tl.load(tab_ptr + (b & 15)).to(tl.float32)
        kb = 2 * kp0 + j * SUB  # first column of each slab
        cidx = n[None, :] * G + (kb // BS)[:, None]
        cmask = n_mask[None, :] & (kb < 2 * kp_hi)[:, None]
        s, _zp = _block_consts(cidx, cmask, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, ntab_ptr, NESTED, NBS, False)
        w_hi = tl.reshape(v_hi * s[:, None, :], [BLOCK_K // 2, BLOCK_N])
        w_lo = tl.reshape(v_lo * s[:, None, :], [BLOCK_K // 2, BLOCK_N])
        acc += tl.dot(xe, w_hi.to(DOT_DTYPE), input_precision=DOT_PREC)
        acc += tl.dot(xo, w_lo.to(DOT_DTYPE), input_precision=DOT_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]  # only the first K split adds the bias
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# ---------------------------------------------------------------------------------------------
# weight-only backward: grad_x[M, K] = grad_y[M, N] @ W[N, K], W decoded tile by tile (the
# reduction runs over N; SPLIT over N with fp32 atomics for small M)
# ---------------------------------------------------------------------------------------------


@triton.jit
def wo_grad_kernel(
    g_ptr, out_ptr,
    codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
    M, N, K, KH, G, stride_gm, stride_om, N_SPLIT,
    LAYOUT: tl.constexpr, PAIRS: tl.constexpr, ALIGNED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    NESTED: tl.constexpr, HAS_ZP: tl.constexpr, ATOMIC: tl.constexpr,
    IDX64: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    o_rows = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om
    n_lo = pid_s * N_SPLIT
    n_hi = tl.minimum(n_lo + N_SPLIT, N)
    k0 = pid_k * BLOCK_K
    if PAIRS:
        kp = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        k_mask = kp < KH
        acc_e = tl.full([BLOCK_M, BLOCK_K // 2], 0, tl.float32)
        acc_o = tl.full([BLOCK_M, BLOCK_K // 2], 0, tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_hi
            g = tl.load(g_rows + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            n = offs_n
            if IDX64:
                n = n.to(tl.int64)
            w_hi, w_lo = _decode_pairs(
                codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
                n[:, None], kp[None, :], k0, n_mask[:, None], n_mask[:, None] & k_mask[None, :], K, KH, G,
                LAYOUT, ALIGNED, BS, NBS, NESTED, HAS_ZP,
            )  # fmt: skip
            g = g.to(DOT_DTYPE)
            acc_e += tl.dot(g, w_hi.to(DOT_DTYPE), input_precision=DOT_PREC)
            acc_o += tl.dot(g, w_lo.to(DOT_DTYPE), input_precision=DOT_PREC)
        # Re-interleave even/odd columns so the store is contiguous.
        acc = tl.reshape(tl.join(acc_e, acc_o), [BLOCK_M, BLOCK_K])
        offs_k = k0 + tl.arange(0, BLOCK_K)
        o_mask = m_mask[:, None] & (offs_k < K)[None, :]
        if ATOMIC:
            tl.atomic_add(o_rows + offs_k[None, :], acc, mask=o_mask, sem="relaxed")
        else:
            tl.store(o_rows + offs_k[None, :], acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        acc = tl.full([BLOCK_M, BLOCK_K], 0, tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_hi
            g = tl.load(g_rows + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            n = offs_n
            if IDX64:
                n = n.to(tl.int64)
            w_mask = n_mask[:, None] & k_mask[None, :]
            # int8's per-channel scale runs along the reduction axis here: applied before the dot.
            w = _decode_tile(
                codes_ptr, s_ptr, zp_ptr, ncode_ptr, nabs_ptr, noff_ptr, tab_ptr, ntab_ptr,
                n, offs_n, offs_k, k0, n_mask, w_mask, K, G, LAYOUT, ALIGNED, BS, NBS, NESTED, HAS_ZP,
            )  # fmt: skip
            acc += tl.dot(g.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PREC)
        o_mask = m_mask[:, None] & k_mask[None, :]
        if ATOMIC:
            tl.atomic_add(o_rows + offs_k[None, :], acc, mask=o_mask, sem="relaxed")
        else:
            tl.store(o_rows + offs_k[None, :], acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# ---------------------------------------------------------------------------------------------
# W8A8: per-token (or static) activation quantization, then int8 x int8 -> int32 GEMM
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_half_even(v):
    """torch.round semantics (ties to even) without libdevice (the interpreter lacks extern calls)."""
    f = tl.floor(v)
    d = v - f  # exact for |v| < 2**23
    r = tl.where(d > 0.5, f + 1.0, f)
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d == 0.5) & odd, f + 1.0, r)


@triton.jit
def act_quant_kernel(
    x_ptr, q_ptr, sx_ptr, act_scale_ptr, K, stride_xm, stride_qm,
    STATIC: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program per token: s = amax/127 (or the static scale), q = clamp(round(x / s), -127, 127)."""
    m = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + m * stride_xm
    if STATIC:
        s = tl.load(act_scale_ptr).to(tl.float32)
    else:
        amax = tl.full([BLOCK_K], 0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        # div_rn: IEEE division like torch, so the codes match the reference bit for bit.
        s = tl.math.div_rn(tl.reduce(amax, 0, _max), 127.0)
    safe = tl.where(s > 0, s, 1.0)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs < K
        v = tl.load(x_row + offs, mask=k_mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(v, safe)), -127.0), 127.0)
        tl.store(q_ptr + m * stride_qm + offs, q.to(tl.int8), mask=k_mask)
    tl.store(sx_ptr + m, s)


@triton.jit
def w8a8_kernel(
    xq_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, out_ptr,
    M, N, K, stride_qm, stride_om, K_SPLIT,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n = offs_n
    if IDX64:
        n = n.to(tl.int64)
    a_rows = xq_ptr + offs_m.to(tl.int64)[:, None] * stride_qm
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(
            w_ptr + n[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0,
            eviction_policy="evict_first",
        )  # fmt: skip
        acc += tl.dot(a, b)  # int8 x int8 -> exact int32
    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y += tl.where(pid_k == 0, b, 0.0)[None, :]  # only the first K split adds the bias
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, y, mask=o_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=o_mask)


# ---------------------------------------------------------------------------------------------
# weight fingerprints: RUN bytes read at each of many absolute addresses, in one launch
# ---------------------------------------------------------------------------------------------


@triton.jit
def read_runs_kernel(addr_ptr, out_ptr, RUN: tl.constexpr):
    r = tl.program_id(0)
    base = tl.load(addr_ptr + r).to(tl.pointer_type(tl.uint8))  # another tensor's memory, by address
    offs = tl.arange(0, RUN)
    tl.store(out_ptr + r.to(tl.int64) * RUN + offs, tl.load(base + offs))
