"""Launchers: the public functions with the reference signatures, and their grad-input kernels.

See the package docstring for the contract. Every function flattens ``x`` to [M, K], picks a kernel
variant by M (the wide GEMV for M <= 4 where the weight allows it, else GEMV for M == 1, split-K
tl.dot for M <= 64, tiled GEMM above; see WIDE_GEMV and WIDE_DOT_ROWS below), picks a config
(see :mod:`.autotune`) and launches. From a per-format M on (``_decode_min_m``) a call instead decodes
W to the activation dtype and hands the GEMM to cuBLAS. No host synchronisation happens on the launch path (nested
offset and scales are read by the kernel), so the functions can be captured in CUDA graphs once
their configs are tuned (capturing before that uses the heuristic config).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from . import autotune as at
from ._runtime import kernels_for

CODEBOOK, INT4, INT8 = 0, 1, 2  # the kernels' LAYOUT constexpr (kernel stems; codebook = nf4, fp4)
_LAYOUT_NAME = {CODEBOOK: "codebook", INT4: "int4", INT8: "int8"}
_IDX32_LIMIT = 2**31 - 1

# Small-M (decode) path switches, read on every call so one process can A/B them (the benchmark's
# ``-old`` / ``-glb`` / ``-sel`` / ``-tlg`` / ``-npf`` format suffixes flip them):
# WIDE_GEMV: M <= autotune.WIDE_M_MAX runs ``wo_gemv_wide_kernel`` (K tiles spanning several
#   constant blocks, M rows per program) wherever the weight allows it (see ``_Weight.wide``);
#   False = the previous kernels (``wo_gemv_kernel`` for M == 1, the split-K tl.dot kernel above).
# LUT: how the wide kernel finds NF4/FP4 table entries: "global" = gather from the 16-entry table in
#   global memory (L1-resident), "select" = a select tree over the code bits on 16 scalars (registers
#   only), "gather" = tl.gather on a register copy of the table, "pairs" = one 8-byte gather per code
#   byte from a 256-entry table of (table[hi], table[lo]) pairs (built once per table, see _pair_table).
# PREFETCH: the wide 4-bit kernel loads the next K tile's codes before decoding the current one.
WIDE_GEMV = True
LUT = "global"
PREFETCH = True
# WIDE_ROWS: per layout, the M up to which WIDE_GEMV takes the wide kernel (H200 with CUDA graphs,
# heuristic configs; `results/gpu_kernels.md`): nested NF4 at M=1 0.74-0.83x bf16 with the "global"
# table against 0.62-0.80x before, at M=2 0.50-0.65x against 0.13-0.18x (decode-then-cuBLAS: 0.30-0.55x);
# at M=4 no better than decoding first. int4 and int8 lost to their previous kernels at every M = 1..4
# (8192^2, M=4: 0.39x and 0.57x against 0.99x and 1.20x), so they keep those.
WIDE_ROWS = {CODEBOOK: 2, INT4: 0, INT8: 0}


def _env_rows(name: str, default: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return max(int(raw) if raw else default, 0)
    except ValueError:
        raise ValueError(f"qbackend triton kernels: {name}={raw!r} is not an integer (rows of x, e.g. 64)") from None


# WIDE_DOT_ROWS: per layout, the M up to which ``wo_dot_wide_kernel`` (tl.dot over K tiles spanning
# several constant blocks, nested constants decoded once per block) runs instead of decoding W first
# (nested) or the split-K tl.dot kernel, where ``_Weight.wide`` holds; rows the wide GEMV takes stay
# with it. Codebook only, and nested constants only unless WIDE_DOT_PLAIN (plain NF4/FP4 was not
# measured). Measured on the H200 (CUDA graphs, heuristic configs, `results/gpu_kernels.md`): against
# decode-then-cuBLAS at M = 3..8 0.43-0.48x of bf16 vs 0.33-0.34x on 8192^2, 8192x28672 and 28672x8192,
# level on 4096^2 (0.54-0.55x); at M = 16-32 it wins by 5-18% on the large shapes but loses on 4096^2
# (0.43-0.45x vs 0.54-0.55x), at M = 64 it loses everywhere. Hence 8. The environment variable
# QBACKEND_WIDE_DOT_ROWS overrides the start value (0 = off) for benchmarks.
WIDE_DOT_ROWS = {CODEBOOK: _env_rows("QBACKEND_WIDE_DOT_ROWS", 8)}
WIDE_DOT_PLAIN = False
_LUTS = {"global": 0, "select": 1, "gather": 2, "pairs": 3}
# Keyed by the caller's table tensor itself (code_table() hands out cached tensors), so an entry dies
# with its table and a new table at a recycled address can never meet a stale pair table.
_pair_tables: WeakIdKeyDictionary = WeakIdKeyDictionary()  # by identity: Tensor.__eq__ is elementwise
_pair_lock = threading.Lock()


def _pair_table(table: torch.Tensor) -> torch.Tensor | None:
    """fp32 [256, 2]: row b = (table[b >> 4], table[b & 15]), cached per table tensor and version.

    None while a CUDA graph is being captured and no pair table exists yet (it would only be filled
    on replay): the caller then uses the plain table.
    """
    version = _version(table)
    with _pair_lock:
        hit = _pair_tables.get(table)
    if hit is not None and hit[0] == version:
        return hit[1]
    if table.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    t = table.detach().reshape(-1).float()
    pt = torch.stack([t.repeat_interleave(16), t.repeat(16)], 1).contiguous()
    with _pair_lock:
        _pair_tables[table] = (version, pt)
    return pt


def _version(t: torch.Tensor) -> int:
    """In-place modification counter; inference tensors have none (-1: treated as never modified)."""
    try:
        return t._version
    except RuntimeError:
        return -1


@dataclass
class _Weight:
    """The weight operands of one weight-only call, as the kernels take them."""

    layout: int
    n: int
    k: int
    codes: torch.Tensor
    scale: torch.Tensor | None = None  # absmax (codebook, plain) / per-group or per-channel scale
    zp: torch.Tensor | None = None
    ncodes: torch.Tensor | None = None
    nabs: torch.Tensor | None = None
    noff: torch.Tensor | None = None
    table: torch.Tensor | None = None
    ntable: torch.Tensor | None = None
    bs: int = 0  # codebook block size / int4 group size (0 for int8)
    table_src: torch.Tensor | None = None  # the caller's table tensor (key of the pair-table cache)
    nbs: int = 256

    @property
    def nested(self) -> bool:
        return self.ncodes is not None

    @property
    def groups(self) -> int:
        """int4: constants per row (the tail group may be shorter); 0 otherwise."""
        return triton.cdiv(self.k, self.bs) if self.layout == INT4 else 0

    @property
    def pairs(self) -> bool:
        """Byte-pair path: rows start on a byte (K even) and a pair never straddles two blocks (bs even)."""
        return self.layout != INT8 and self.k % 2 == 0 and self.bs % 2 == 0

    @property
    def wide(self) -> bool:
        """Can the wide GEMV take this weight? int8 always; 4-bit with byte pairs, a power-of-two block
        size, and (codebook) blocks that do not straddle rows."""
        if self.layout == INT8:
            return True
        if not self.pairs or self.bs & (self.bs - 1):
            return False
        return self.layout == INT4 or self.k % self.bs == 0

    @property
    def idx64(self) -> bool:
        return self.n * self.k > _IDX32_LIMIT

    def ptr_args(self) -> tuple[torch.Tensor | None, ...]:
        return (self.codes, self.scale, self.zp, self.ncodes, self.nabs, self.noff, self.table, self.ntable)

    def aligned(self, block_k: int) -> bool:
        """Does every K tile of width ``block_k`` (starting at a multiple of it) sit in one block per row?"""
        if self.layout == CODEBOOK:
            return self.k % self.bs == 0 and self.bs % block_k == 0
        if self.layout == INT4:
            return self.bs % block_k == 0
        return False

    def bk_cap(self, min_block: int) -> int:
        """Largest K tile that keeps the aligned path (256 = no constraint when it is unavailable)."""
        if self.layout == INT8 or (self.layout == CODEBOOK and self.k % self.bs):
            return 256
        p = self.bs & -self.bs  # largest power of two dividing the block size
        return p if p >= min_block else 256

    def key_parts(self) -> tuple[str, int, bool, bool]:
        return _LAYOUT_NAME[self.layout], self.bs, self.nested, self.zp is not None

    def check_device(self, device: torch.device) -> None:
        """Every operand on the activations' device (a kernel cannot read another device's memory)."""
        for t in self.ptr_args():
            if t is not None and t.device != device:
                _fail(f"weight operands must be on {device} like the input; found one on {t.device}")


def _fail(msg: str) -> None:
    raise ValueError(f"qbackend triton kernels: {msg}")


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


def _rows(x: torch.Tensor, k: int, what: str = "x") -> torch.Tensor:
    """[..., K] -> [M, K] with unit stride along K (a view whenever possible)."""
    if x.dim() == 0 or x.shape[-1] != k:
        _fail(f"{what} has shape {tuple(x.shape)}; expected [..., {k}]")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        _fail(f"{what} dtype {x.dtype} is not supported (float32, float16, bfloat16)")
    x2 = x.reshape(-1, k)
    if x2.shape[0] > 0 and (x2.stride(1) != 1 or x2.stride(0) < k):
        x2 = x2.contiguous()
    return x2


def _dot_dtype(dtype: torch.dtype, interpreted: bool) -> tuple[tl.dtype, str]:
    """Tensor-core operand dtype and fp32 precision. The interpreter gets bf16 dots wrong: fp32 there."""
    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16 and not interpreted:
        return tl.bfloat16, "tf32"
    return tl.float32, "ieee"  # fp32 activations: match the fp32 reference, no tf32 rounding


def _split(depth: int, split: int, block: int) -> tuple[int, int]:
    """(elements per split, multiple of ``block``; number of non-empty splits)."""
    per = triton.cdiv(triton.cdiv(depth, max(split, 1)), block) * block
    return per, triton.cdiv(depth, per)


def _sms(device: torch.device, interpreted: bool) -> int:
    return 1 if interpreted else at.sm_count(device)


# ---------------------------------------------------------------------------------------------
# weight-only forward
# ---------------------------------------------------------------------------------------------


def _wo_forward(x: torch.Tensor, w: _Weight, bias: torch.Tensor | None) -> torch.Tensor:
    x2 = _rows(x, w.k)
    m = x2.shape[0]
    lead = x.shape[:-1]
    if bias is not None:
        if bias.numel() != w.n:
            _fail(f"bias has {bias.numel()} elements; expected {w.n}")
        bias = _flat(bias)
    w.check_device(x.device)
    if bias is not None and bias.device != x.device:
        _fail(f"bias must be on {x.device} like the input; found {bias.device}")
    if m == 0:
        return x.new_zeros(*lead, w.n)
    kern, interp = kernels_for(x.device)
    if _wide_dot_here(w, m):
        return _wo_forward_wide_dot(kern, interp, x2, w, bias).reshape(*lead, w.n)
    if m >= _decode_min_m(w, grad=False):
        b = None if bias is None else bias.to(x2.dtype)
        return F.linear(x2, _decoded(kern, w, x2.dtype), b).reshape(*lead, w.n)
    if WIDE_GEMV and m <= min(at.WIDE_M_MAX, WIDE_ROWS[w.layout]) and w.wide:
        return _wo_forward_wide(kern, interp, x2, w, bias).reshape(*lead, w.n)
    variant = at.GEMV if m == 1 else at.WO_SMALL if m <= at.SMALL_M_MAX else at.WO_LARGE
    dot_dtype, prec = _dot_dtype(x.dtype, interp)

    def launch(cfg: at.KernelConfig) -> torch.Tensor:
        return _launch_wo_forward(kern, variant, cfg, x2, w, bias, dot_dtype, prec)

    sms = _sms(x.device, interp)
    min_bk = 16 if variant == at.GEMV else 32
    key = at.make_key(variant, *w.key_parts(), x.dtype, m, w.n, w.k)
    cfg = at.select_config(
        variant, key, x.device, interp, m,
        default=lambda: at.heuristic_config(variant, m, w.n, w.k, w.bk_cap(min_bk), sms),
        candidates=lambda: at.candidate_configs(variant, m, w.n, w.k, w.bk_cap(min_bk), sms),
        bench=launch,
    )  # fmt: skip
    return at.launch_fitting(key, x.device, cfg, launch).reshape(*lead, w.n)


def _table_lookup(w: _Weight, gather: bool) -> tuple[int, torch.Tensor | None]:
    """(the wide kernels' LUT code for ``linear.LUT``, the pair table or None) for weight ``w``: layouts
    without a code table use 0; without ``gather`` (the dot kernel has no tl.gather path) "gather" reads
    the global table; "pairs" falls back to it where no pair table can be made."""
    if LUT not in _LUTS:
        _fail(f"linear.LUT is {LUT!r}; expected one of {sorted(_LUTS)}")
    lut = _LUTS[LUT] if w.layout == CODEBOOK else 0
    if lut == 2 and not gather:
        lut = 0
    ptab = _pair_table(w.table_src if w.table_src is not None else w.table) if lut == 3 else None
    if lut == 3 and ptab is None:
        lut = 0
    return lut, ptab


def _wo_forward_wide(kern, interp: bool, x2: torch.Tensor, w: _Weight, bias: torch.Tensor | None) -> torch.Tensor:
    m = x2.shape[0]
    lut, ptab = _table_lookup(w, gather=True)

    def launch(cfg: at.KernelConfig) -> torch.Tensor:
        return _launch_wo_wide(kern, cfg, x2, w, bias, lut, ptab)

    sms = _sms(x2.device, interp)
    per_byte = 1 if w.layout == INT8 else 2  # weight columns per byte (the wide variant's "bk_cap")
    layout, bs, nested, zp = w.key_parts()
    tag = layout + ("" if lut == 0 else f"-lut{lut}") + ("" if PREFETCH else "-npf")
    key = at.make_key(at.GEMV_WIDE, tag, bs, nested, zp, x2.dtype, m, w.n, w.k)
    cfg = at.select_config(
        at.GEMV_WIDE, key, x2.device, interp, m,
        default=lambda: at.heuristic_config(at.GEMV_WIDE, m, w.n, w.k, per_byte, sms),
        candidates=lambda: at.candidate_configs(at.GEMV_WIDE, m, w.n, w.k, per_byte, sms),
        bench=launch,
    )  # fmt: skip
    return at.launch_fitting(key, x2.device, cfg, launch)



def _wide_dot_here(w: _Weight, m: int) -> bool:
    """Does ``wo_dot_wide_kernel`` take this call (see WIDE_DOT_ROWS)?"""
    if w.layout != CODEBOOK or m > WIDE_DOT_ROWS.get(w.layout, 0) or not w.wide:
        return False
    if not (w.nested or WIDE_DOT_PLAIN):
        return False
    return not (WIDE_GEMV and m <= min(at.WIDE_M_MAX, WIDE_ROWS[w.layout]))


def _wo_forward_wide_dot(kern, interp: bool, x2: torch.Tensor, w: _Weight, bias: torch.Tensor | None) -> torch.Tensor:
    m = x2.shape[0]
    lut, ptab = _table_lookup(w, gather=False)
    dot_dtype, prec = _dot_dtype(x2.dtype, interp)

    def launch(cfg: at.KernelConfig) -> torch.Tensor:
        return _launch_wo_dot_wide(kern, cfg, x2, w, bias, lut, ptab, dot_dtype, prec)

    sms = _sms(x2.device, interp)
    layout, bs, nested, zp = w.key_parts()
    tag = layout + ("" if lut == 0 else f"-lut{lut}") + ("" if PREFETCH else "-npf")
    key = at.make_key(at.DOT_WIDE, tag, bs, nested, zp, x2.dtype, m, w.n, w.k)
    cfg = at.select_config(
        at.DOT_WIDE, key, x2.device, interp, m,
        default=lambda: at.dot_wide_config(m, w.n, w.k, *at.dot_wide_tile(m, x2.dtype == torch.float32), sms),
        candidates=lambda: at.candidate_configs(at.DOT_WIDE, m, w.n, w.k, 0, sms),
        bench=launch,
    )  # fmt: skip
    return at.launch_fitting(key, x2.device, cfg, launch)


def _launch_wo_dot_wide(
    kern, cfg: at.KernelConfig, x2: torch.Tensor, w: _Weight, bias: torch.Tensor | None, lut: int,
    ptab: torch.Tensor | None, dot_dtype: tl.dtype, prec: str,
) -> torch.Tensor:  # fmt: skip
    m, k = x2.shape
    n = w.n
    bk = max(cfg.block_k, 32)  # two half-depth dots of at least 16
    # K_SPLIT is a multiple of BLOCK_K, so every tile starts on a slab (SUB columns) boundary.
    k_split, split = _split(k, cfg.split, bk)
    atomic = split > 1
    out = _split_out(x2, m, n, atomic)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    kern.wo_dot_wide_kernel[grid](
        x2, out, bias, *w.ptr_args(), ptab, m, n, k, k // 2, k // w.bs, x2.stride(0), out.stride(0),
        k_split, k_split // 2,
        BS=w.bs, SUB=min(w.bs, bk), NBS=w.nbs, NESTED=w.nested, HAS_BIAS=bias is not None, ATOMIC=atomic,
        IDX64=w.idx64, LUT=lut, PREFETCH=PREFETCH, DOT_DTYPE=dot_dtype, DOT_PREC=prec,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True,
    )  # fmt: skip
    return out.to(x2.dtype) if atomic and x2.dtype != torch.float32 else out


def _split_out(x2: torch.Tensor, m: int, n: int, atomic: bool) -> torch.Tensor:
    """The output of a launch: fp32 zeros when split-K programs add into it atomically, else empty."""
    if atomic:
        return torch.zeros((m, n), dtype=torch.float32, device=x2.device)
    return torch.empty((m, n), dtype=x2.dtype, device=x2.device)

def _launch_wo_wide(
    kern, cfg: at.KernelConfig, x2: torch.Tensor, w: _Weight, bias: torch.Tensor | None, lut: int,
    ptab: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    m, k = x2.shape
    n = w.n
    bk = cfg.block_k
    bm = at.wide_block_m(min(m, cfg.block_m))
    # K_SPLIT is a multiple of BLOCK_K, so every tile starts on a slab (SUB columns) boundary.
    k_split, split = _split(k, cfg.split, bk)
    atomic = split > 1
    out = _split_out(x2, m, n, atomic)
    # Constants per row: codebook blocks are row-local here (K % bs == 0); int4 has a shorter tail group.
    g = 0 if w.layout == INT8 else k // w.bs if w.layout == CODEBOOK else w.groups
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, bm))
    kern.wo_gemv_wide_kernel[grid](
        x2, out, bias, *w.ptr_args(), ptab, m, n, k, k // 2, g, x2.stride(0), out.stride(0), k_split, k_split // 2,
        LAYOUT=w.layout, BS=max(w.bs, 1), SUB=min(max(w.bs, 1), bk), NBS=w.nbs, NESTED=w.nested,
        HAS_ZP=w.zp is not None, HAS_BIAS=bias is not None, ATOMIC=atomic, IDX64=w.idx64,
        LUT=lut, SIGNED=w.codes.dtype == torch.int8, PREFETCH=PREFETCH and w.layout != INT8,
        BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=bk,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True,
    )  # fmt: skip
    return out.to(x2.dtype) if atomic and x2.dtype != torch.float32 else out


def _launch_wo_forward(
    kern, variant: str, cfg: at.KernelConfig, x2: torch.Tensor, w: _Weight, bias: torch.Tensor | None,
    dot_dtype: tl.dtype, prec: str,
) -> torch.Tensor:  # fmt: skip
    m, k = x2.shape
    n = w.n
    bk = cfg.block_k
    # Even K: one 16-byte-vectorisable byte load per column pair; odd K: per-element nibble pick.
    pairs = w.pairs
    k_split, split = _split(k, cfg.split, bk)
    atomic = split > 1
    out = _split_out(x2, m, n, atomic)
    common = dict(
        LAYOUT=w.layout, PAIRS=pairs, ALIGNED=w.aligned(bk), BS=max(w.bs, 1), NBS=w.nbs, NESTED=w.nested,
        HAS_ZP=w.zp is not None, HAS_BIAS=bias is not None, ATOMIC=atomic, IDX64=w.idx64,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True,
    )  # fmt: skip
    if variant == at.GEMV:
        grid = (triton.cdiv(n, cfg.block_n), split, m)
        kern.wo_gemv_kernel[grid](
            x2, out, bias, *w.ptr_args(), n, k, k // 2, w.groups, x2.stride(0), out.stride(0), k_split, k_split // 2,
            BLOCK_N=cfg.block_n, BLOCK_K=bk, **common,
        )  # fmt: skip
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        kern.wo_dot_kernel[grid](
            x2, out, bias, *w.ptr_args(), m, n, k, k // 2, w.groups, x2.stride(0), out.stride(0), k_split, k_split // 2,
            DOT_DTYPE=dot_dtype, DOT_PREC=prec,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, GROUP_M=cfg.group_m, **common,
        )  # fmt: skip
    return out.to(x2.dtype) if atomic and x2.dtype != torch.float32 else out


# ---------------------------------------------------------------------------------------------
# large M: decode W once, then the library GEMM
# ---------------------------------------------------------------------------------------------

# From M on, decoding W to the activation dtype and running cuBLAS beats the fused kernels (H200:
# at 8192^2, M=4096 the fused int4/int8 GEMMs ran at 0.5-0.6x bf16 and nested NF4 at 0.09x; nested
# NF4 was also 0.13-0.2x from M=2 up (decode first: 0.30-0.55x at M=2..15; at M=1-2 the wide GEMV
# wins, see WIDE_ROWS), and its grad-input kernel 0.11-0.15x at every M).
_DECODE_M = 512
_NESTED_DECODE_M = 3
_NESTED_GRAD_DECODE_M = 1
_DECODE_ROWS = 64  # rows of W per program; columns: up to 128, inside one block where possible


def _decode_min_m(w: _Weight, grad: bool) -> int:
    """Smallest M at which a call decodes W and calls cuBLAS instead of a fused kernel."""
    if w.layout == CODEBOOK and w.nested:
        return _NESTED_GRAD_DECODE_M if grad else _NESTED_DECODE_M
    return _DECODE_M


def _decoded(kern, w: _Weight, dtype: torch.dtype) -> torch.Tensor:
    """W as a dense [N, K] tensor of ``dtype`` (a transient: one layer's weight at a time)."""
    out = torch.empty((w.n, w.k), dtype=dtype, device=w.codes.device)
    bn, bk = _DECODE_ROWS, min(128, w.bk_cap(32))
    grid = (triton.cdiv(w.n, bn), triton.cdiv(w.k, bk))
    kern.wo_decode_kernel[grid](
        out, *w.ptr_args(), w.n, w.k, w.k // 2, w.groups,
        LAYOUT=w.layout, PAIRS=w.pairs, ALIGNED=w.aligned(bk), BS=max(w.bs, 1), NBS=w.nbs, NESTED=w.nested,
        HAS_ZP=w.zp is not None, IDX64=w.idx64, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
        enable_fp_fusion=False,  # the nested constant's product and sum stay separately rounded (exact)
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# weight-only grad_input: grad_x = grad_y @ W
# ---------------------------------------------------------------------------------------------


def _wo_grad(grad_y: torch.Tensor, w: _Weight) -> torch.Tensor:
    g2 = _rows(grad_y, w.n, "grad_y")
    m = g2.shape[0]
    lead = grad_y.shape[:-1]
    w.check_device(grad_y.device)
    if m == 0:
        return grad_y.new_zeros(*lead, w.k)
    kern, interp = kernels_for(grad_y.device)
    if m >= _decode_min_m(w, grad=True):
        return torch.mm(g2, _decoded(kern, w, g2.dtype)).reshape(*lead, w.k)
    variant = at.GRAD_SMALL if m <= at.SMALL_M_MAX else at.GRAD_LARGE
    dot_dtype, prec = _dot_dtype(grad_y.dtype, interp)

    def launch(cfg: at.KernelConfig) -> torch.Tensor:
        return _launch_wo_grad(kern, cfg, g2, w, dot_dtype, prec)

    sms = _sms(grad_y.device, interp)
    key = at.make_key(variant, *w.key_parts(), grad_y.dtype, m, w.n, w.k)
    cfg = at.select_config(
        variant, key, grad_y.device, interp, m,
        default=lambda: at.heuristic_config(variant, m, w.n, w.k, w.bk_cap(32), sms),
        candidates=lambda: at.candidate_configs(variant, m, w.n, w.k, w.bk_cap(32), sms),
        bench=launch,
    )  # fmt: skip
    return at.launch_fitting(key, grad_y.device, cfg, launch).reshape(*lead, w.k)


def _launch_wo_grad(
    kern, cfg: at.KernelConfig, g2: torch.Tensor, w: _Weight, dot_dtype: tl.dtype, prec: str
) -> torch.Tensor:
    m, n = g2.shape
    k = w.k
    bk = cfg.block_k  # output tile along K
    n_split, split = _split(n, cfg.split, cfg.block_n)
    atomic = split > 1
    if atomic:
        out = torch.zeros((m, k), dtype=torch.float32, device=g2.device)
    else:
        out = torch.empty((m, k), dtype=g2.dtype, device=g2.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(k, bk), split)
    kern.wo_grad_kernel[grid](
        g2, out, *w.ptr_args(), m, n, k, k // 2, w.groups, g2.stride(0), out.stride(0), n_split,
        LAYOUT=w.layout, PAIRS=w.pairs, ALIGNED=w.aligned(bk), BS=max(w.bs, 1), NBS=w.nbs,
        NESTED=w.nested, HAS_ZP=w.zp is not None, ATOMIC=atomic, IDX64=w.idx64,
        DOT_DTYPE=dot_dtype, DOT_PREC=prec,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True,
    )  # fmt: skip
    return out.to(g2.dtype) if atomic and g2.dtype != torch.float32 else out


# ---------------------------------------------------------------------------------------------
# operand checks (shape only: no device->host reads)
# ---------------------------------------------------------------------------------------------


def _codebook_weight(
    codes: torch.Tensor, absmax: torch.Tensor | None, nested_codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None, nested_offset: torch.Tensor | None, table: torch.Tensor,
    nested_table: torch.Tensor | None, out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> _Weight:  # fmt: skip
    numel = out_features * in_features
    if codes.dtype != torch.uint8 or codes.numel() != (numel + 1) // 2:
        _fail(f"codes must be uint8 with {(numel + 1) // 2} bytes for [{out_features}, {in_features}]")
    if blocksize < 1 or nested_blocksize < 1:
        _fail(f"block sizes must be positive, got {blocksize} and {nested_blocksize}")
    nblocks = triton.cdiv(numel, blocksize)
    if table.numel() != 16:
        _fail(f"table must have 16 entries, got {table.numel()}")
    if nested_codes is not None:
        if nested_absmax is None or nested_offset is None or nested_table is None:
            _fail("nested constants need nested_codes, nested_absmax, nested_offset and nested_table")
        if nested_codes.numel() != nblocks or nested_absmax.numel() < triton.cdiv(nblocks, nested_blocksize):
            _fail(f"nested constants do not cover {nblocks} blocks of {blocksize}")
        if nested_table.numel() != 256 or nested_offset.numel() != 1:
            _fail("nested_table must have 256 entries and nested_offset one")
        return _Weight(
            CODEBOOK, out_features, in_features, _flat(codes), ncodes=_flat(nested_codes), nabs=_flat(nested_absmax),
            noff=_flat(nested_offset), table=_flat(table), ntable=_flat(nested_table), bs=blocksize,
            nbs=nested_blocksize, table_src=table,
        )  # fmt: skip
    if absmax is None or absmax.numel() < nblocks:
        _fail(f"absmax must hold {nblocks} block constants")
    return _Weight(
        CODEBOOK, out_features, in_features, _flat(codes), scale=_flat(absmax), table=_flat(table), bs=blocksize,
        table_src=table,
    )  # fmt: skip


def _int4_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, out_features: int, in_features: int,
    groupsize: int,
) -> _Weight:  # fmt: skip
    numel = out_features * in_features
    if codes.dtype != torch.uint8 or codes.numel() != (numel + 1) // 2:
        _fail(f"int4 codes must be uint8 with {(numel + 1) // 2} bytes for [{out_features}, {in_features}]")
    if groupsize < 1:
        _fail(f"int4 group size must be positive, got {groupsize}")
    groups = triton.cdiv(in_features, groupsize)
    if scale.numel() != out_features * groups:
        _fail(f"scale has {scale.numel()} elements; expected [{out_features}, {groups}]")
    if zero_point is not None and zero_point.numel() != out_features * groups:
        _fail(f"zero_point has {zero_point.numel()} elements; expected [{out_features}, {groups}]")
    return _Weight(
        INT4, out_features, in_features, _flat(codes), scale=_flat(scale), zp=_flat(zero_point), bs=groupsize
    )


def _channel_scale(scale: torch.Tensor, n: int) -> torch.Tensor:
    """Per-channel scale; a single per-tensor scale is broadcast (the reference accepts it too)."""
    if scale.numel() == 1 and n != 1:
        return scale.reshape(1).expand(n).contiguous()
    return scale


def _int8_weight(codes: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int) -> _Weight:
    if codes.dtype not in (torch.int8, torch.uint8) or codes.numel() != out_features * in_features:
        _fail(f"int8 codes must be int8 with {out_features * in_features} elements")
    scale = _channel_scale(scale, out_features)
    if scale.numel() != out_features:
        _fail(f"scale has {scale.numel()} elements; expected {out_features} (one per output channel)")
    return _Weight(INT8, out_features, in_features, _flat(codes), scale=_flat(scale))


# ---------------------------------------------------------------------------------------------
# public functions (reference signatures)
# ---------------------------------------------------------------------------------------------


def codebook_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    table: torch.Tensor,
    nested_table: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    nested_blocksize: int,
) -> torch.Tensor:
    """y = x @ W^T + b for an NF4/FP4 weight (plain or nested constants), decoded in the kernel."""
    w = _codebook_weight(
        codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
        out_features, in_features, blocksize, nested_blocksize,
    )  # fmt: skip
    return _wo_forward(x, w, bias)


def codebook_linear_grad_input(
    grad_y: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    table: torch.Tensor,
    nested_table: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    nested_blocksize: int,
) -> torch.Tensor:
    """grad_x = grad_y @ W ([..., N] -> [..., K], grad_y's dtype, fp32 accumulation)."""
    w = _codebook_weight(
        codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
        out_features, in_features, blocksize, nested_blocksize,
    )  # fmt: skip
    return _wo_grad(grad_y, w)


def int4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    groupsize: int,
) -> torch.Tensor:
    """y = x @ W^T + b for int4 codes (zero point 8 when ``zero_point`` is None), one scale per group."""
    return _wo_forward(x, _int4_weight(codes, scale, zero_point, out_features, in_features, groupsize), bias)


def int4_linear_grad_input(
    grad_y: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    out_features: int,
    in_features: int,
    groupsize: int,
) -> torch.Tensor:
    """grad_x = grad_y @ W for an int4 weight."""
    return _wo_grad(grad_y, _int4_weight(codes, scale, zero_point, out_features, in_features, groupsize))


def int8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """y = x @ W^T + b for int8 codes with one scale per output channel (applied after the reduction)."""
    return _wo_forward(x, _int8_weight(codes, scale, out_features, in_features), bias)


def int8_linear_grad_input(
    grad_y: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """grad_x = grad_y @ W for an int8 per-channel weight."""
    return _wo_grad(grad_y, _int8_weight(codes, scale, out_features, in_features))


# ---------------------------------------------------------------------------------------------
# W8A8
# ---------------------------------------------------------------------------------------------


def quantize_activations(x: torch.Tensor, act_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [M, K] codes and fp32 [M] scales of ``x`` ([..., K]): per token, or with a static scale.

    Same arithmetic as reference.w8a8_linear (IEEE division, round half to even, clamp to +-127).
    """
    x2 = _rows(x, x.shape[-1] if x.dim() else 0)
    m, k = x2.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, sx
    if act_scale is not None and act_scale.numel() != 1:
        _fail(f"act_scale must be a single (per-tensor) scale, got {act_scale.numel()} elements")
    kern, interp = kernels_for(x.device)
    block = 32 if interp else min(triton.next_power_of_2(k), 2048)
    kern.act_quant_kernel[(m,)](
        x2, xq, sx, _flat(act_scale), k, x2.stride(0), xq.stride(0),
        STATIC=act_scale is not None, BLOCK_K=block, num_warps=4 if block >= 512 else 1, enable_fp_fusion=True,
    )  # fmt: skip
    return xq, sx


def w8a8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """int8 activations x int8 weights -> int32 (tl.dot), rescaled by s_x[m] * s_w[n], bias fused."""
    n, k = out_features, in_features
    if codes.dtype != torch.int8 or codes.numel() != n * k:
        _fail(f"w8a8 codes must be int8 with {n * k} elements")
    scale = _channel_scale(scale, n)
    if scale.numel() != n:
        _fail(f"scale has {scale.numel()} elements; expected {n}")
    if bias is not None and bias.numel() != n:
        _fail(f"bias has {bias.numel()} elements; expected {n}")
    x2 = _rows(x, k)
    m = x2.shape[0]
    lead = x.shape[:-1]
    for t in (codes, scale, bias, act_scale):
        if t is not None and t.device != x.device:
            _fail(f"w8a8 operands must be on {x.device} like the input; found one on {t.device}")
    if m == 0:
        return x.new_zeros(*lead, n)
    xq, sx = quantize_activations(x2, act_scale)
    codes, scale, bias = _flat(codes), _flat(scale), _flat(bias)
    kern, interp = kernels_for(x.device)
    variant = at.W8A8_SMALL if m <= at.SMALL_M_MAX else at.W8A8_LARGE

    def launch(cfg: at.KernelConfig) -> torch.Tensor:
        k_split, split = _split(k, cfg.split, cfg.block_k)
        atomic = split > 1
        if atomic:
            out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        else:
            out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        kern.w8a8_kernel[grid](
            xq, sx, codes, scale, bias, out, m, n, k, xq.stride(0), out.stride(0), k_split,
            HAS_BIAS=bias is not None, ATOMIC=atomic, IDX64=n * k > _IDX32_LIMIT,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True,
        )  # fmt: skip
        return out.to(x.dtype) if atomic and x.dtype != torch.float32 else out

    sms = _sms(x.device, interp)
    key = at.make_key(variant, "w8a8", 0, False, False, x.dtype, m, n, k)
    cfg = at.select_config(
        variant, key, x.device, interp, m,
        default=lambda: at.heuristic_config(variant, m, n, k, 256, sms),
        candidates=lambda: at.candidate_configs(variant, m, n, k, 256, sms),
        bench=launch,
    )  # fmt: skip
    return at.launch_fitting(key, x.device, cfg, launch).reshape(*lead, n)
