"""Block-wise absmax quantization to a code table over the row-major flattened tensor.

This is bitsandbytes' ``quantize_4bit`` / ``quantize_blockwise`` arithmetic, reproduced operation for
operation (reciprocal multiply for full blocks, division for the tail block, nearest code with ties
to the lower one) so the codes and constants are bit-identical.

:func:`blockwise_absmax_codes` is the plain reference (bucketize over the midpoints);
:func:`blockwise_absmax_packed` is the fast CPU path `quantize` uses, producing the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .codebooks import _sorted_midpoints_cpu, code_table, nearest_code
from .packing import pack_4bit
from .scheme import FormatError

_NON_FINITE = "input contains NaN/Inf"


def blockwise_absmax_codes(x: torch.Tensor, blocksize: int, table: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, float) block-wise: returns (flat uint8 codes, fp32 absmax per block).

    A partial tail block is allowed. An all-zero block gets absmax 0 and the code of 0.0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    parts_scaled = []
    parts_absmax = []
    if full:
        body = flat[:full].view(-1, blocksize)
        absmax = body.abs().amax(dim=1)
        # Reciprocal then multiply, as bitsandbytes does: changes the last ulp vs. division.
        inv = 1.0 / absmax.clamp(min=1e-38)
        parts_scaled.append(torch.clamp(body * inv[:, None], -1, 1).view(-1))
        parts_absmax.append(absmax)
    if rem:
        tail = flat[full:]
        am = tail.abs().amax().clamp(min=1e-38)
        parts_scaled.append(torch.clamp(tail / am, -1, 1))
        # bitsandbytes stores the clamped tail absmax (1e-38 for an all-zero tail block).
        parts_absmax.append(am.view(1))
    scaled = parts_scaled[0] if len(parts_scaled) == 1 else torch.cat(parts_scaled)
    absmax = parts_absmax[0] if len(parts_absmax) == 1 else torch.cat(parts_absmax)
    return nearest_code(scaled, table), absmax


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread (restored after).

    For passes over small tensors (block constants: 1/64 of a weight): an OpenMP fork/join per op
    costs more than the op, and on a shared machine each join waits for a descheduled thread.
    """
    prev = torch.get_num_threads()
    if prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


# ---- fast path: block-wise 4-bit quantization straight to packed bytes --------------------------
#
# bucketize (a binary search per element) dominates the simple implementation. Instead the scaled
# value v = y * S (S a power of two, so exact) is cut into unit bins by truncation; every bin holds
# at most one code-table midpoint, so the nearest code is ``lut[bin] + (v > thr[bin])``: one table
# gather and one exact compare. Work runs in chunks of whole blocks through small reusable buffers:
# the intermediates stay in cache and no large temporary is ever allocated (fresh multi-MB tensors
# page-fault, which here costs more than the arithmetic).

_BIN_SCALE = 1024  # v = y * 1024: ~1/1000-wide bins, well under the smallest NF4/FP4 midpoint gap
_BIN_OFFSET = _BIN_SCALE + 1  # trunc(v) lies in [-S, S] (|y| <= 1 + 2^-23); shift to a valid index
_CHUNK_ELEMS = 1 << 18  # 1 MiB of fp32 per buffer: stays in L2


@functools.cache
def _codebook_bin_tables(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lut uint8, thr fp32, byte remap or None) for :func:`blockwise_absmax_packed`.

    For bin b (``trunc(v) == b - _BIN_OFFSET``), the sorted-table index of the nearest code of
    every v in the bin is ``lut[b] + (v > thr[b])`` (``thr`` is +inf for a bin with no midpoint);
    this equals ``bucketize(y, mids)`` (ties to the lower code) exactly. Codebooks whose table is
    not sorted in code order (FP4) also get a 256-entry remap of packed bytes from sorted-index
    order to code order.
    """
    mids, order = _sorted_midpoints_cpu(name)
    ms = [float(m) * _BIN_SCALE + 0.0 for m in mids]  # exact (power-of-two scale); -0.0 -> +0.0
    n_bins = 2 * _BIN_OFFSET + 1
    lut = torch.empty(n_bins, dtype=torch.uint8)
    thr = torch.full((n_bins,), float("inf"), dtype=torch.float32)
    for b in range(n_bins):
        k = b - _BIN_OFFSET
        lo, hi = (k, k + 1) if k > 0 else ((k - 1, k) if k < 0 else (-1, 1))  # hull of {v: trunc(v)=k}
        inside = [j for j, m in enumerate(ms) if lo <= m <= hi]
        if len(inside) > 1:  # pragma: no cover - guards a change of table or scale
            raise AssertionError(f"bin {k} of {name} holds {len(inside)} midpoints; raise _BIN_SCALE")
        if inside:
            lut[b], thr[b] = inside[0], ms[inside[0]]
        else:
            lut[b] = sum(1 for m in ms if m < lo)
    remap = None
    if not torch.equal(order, torch.arange(16, dtype=torch.uint8)):
        byte = torch.arange(256)
        remap = ((order[byte >> 4].to(torch.int32) << 4) | order[byte & 15].to(torch.int32)).to(torch.uint8)
    return lut, thr, remap


class _Buffers:
    """Reusable per-chunk scratch tensors (one set per worker)."""

    def __init__(self, n: int) -> None:
        self.v = torch.empty(n, dtype=torch.float32)
        self.d = torch.empty(n, dtype=torch.float32)
        self.bins = torch.empty(n, dtype=torch.int32)
        self.code8 = torch.empty(n, dtype=torch.uint8)
        self.half = torch.empty(n // 2, dtype=torch.int16)


def _codes_to_packed(
    v: torch.Tensor, out: torch.Tensor, lut: torch.Tensor, thr: torch.Tensor, remap: torch.Tensor | None, buf: _Buffers
) -> None:
    """Write the packed codes of ``v`` (= y * S, even length) into uint8 ``out``."""
    n = v.numel()
    bins, d, code8 = buf.bins[:n], buf.d[:n], buf.code8[:n]
    bins.copy_(v)  # float -> int32 truncates toward zero
    bins.add_(_BIN_OFFSET)
    torch.index_select(thr, 0, bins, out=d)
    torch.index_select(lut, 0, bins, out=code8)
    # (thr - v) < 0 exactly when v > thr (a difference of distinct floats is never 0); its sign bit
    # as int32 >> 31 is -1 or 0. Cheaper than a bool compare plus a cast on this CPU build.
    d.sub_(v)
    di = d.view(torch.int32)
    di.bitwise_right_shift_(31)
    torch.sub(code8, di, out=code8)
    # Pairs as int16 (little-endian: first code in the low byte): the low byte of
    # 16 * pair + (pair >> 8) is 16 * first + second; the cast to uint8 keeps the low byte.
    pairs = code8.view(torch.int16)
    h = buf.half[: n // 2]
    torch.bitwise_right_shift(pairs, 8, out=h)
    torch.add(h, pairs, alpha=16, out=h)
    if remap is None:
        out.copy_(h)
    else:  # sorted-index order -> code order, a byte (two codes) at a time
        h.bitwise_and_(255)
        idx = buf.bins[: n // 2]
        idx.copy_(h)
        torch.index_select(remap, 0, idx, out=out)


def _quantize_rows(
    body: torch.Tensor,
    r_start: int,
    r_end: int,
    rows: int,
    absmax: torch.Tensor,
    packed: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    threads: int | None,
    inference: bool = False,
) -> None:
    """Quantize blocks [r_start, r_end) of ``body`` ([nblocks, blocksize]) into ``absmax``/``packed``.

    ``threads``: when set (a worker thread), run this worker's ops single-threaded and restore that
    count after. ``inference``: the caller's inference mode (thread-local; its tensors may be
    inference tensors, which only inference mode may write).
    """
    if threads is not None:
        torch.set_num_threads(1)
    try:
        with torch.inference_mode(inference), torch.no_grad():
            _quantize_rows_loop(body, r_start, r_end, rows, absmax, packed, tables)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


def _quantize_rows_loop(
    body: torch.Tensor,
    r_start: int,
    r_end: int,
    rows: int,
    absmax: torch.Tensor,
    packed: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
) -> None:
    lut, thr, remap = tables
    blocksize = body.shape[1]
    widen = body.dtype != torch.float32
    buf = _Buffers(min(rows, r_end - r_start) * blocksize)
    for r0 in range(r_start, r_end, rows):
        r1 = min(r_end, r0 + rows)
        c = (r1 - r0) * blocksize
        v = buf.v[:c].view(r1 - r0, blocksize)
        d = buf.d[:c].view(r1 - r0, blocksize)
        src = body[r0:r1]
        if widen:
            v.copy_(src)  # exact widening to fp32, as bitsandbytes' .float()
            src = v
        torch.abs(src, out=d)
        am = absmax[r0:r1]
        torch.amax(d, dim=1, out=am)
        if not bool(torch.isfinite(am).all()):  # amax propagates NaN; checked before any bin lookup
            raise FormatError(_NON_FINITE)
        inv = 1.0 / am.clamp(min=1e-38)  # reciprocal then multiply, as bitsandbytes
        torch.mul(src, inv[:, None], out=v)
        flat_v = buf.v[:c]
        flat_v.mul_(_BIN_SCALE)  # exact; clamping to [-1, 1] cannot change a code, so it is skipped
        _codes_to_packed(flat_v, packed[r0 * blocksize // 2 : r1 * blocksize // 2], lut, thr, remap, buf)


def blockwise_absmax_packed(x: torch.Tensor, blocksize: int, table: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast equivalent of ``pack_4bit(codes)`` for ``codes, absmax = blockwise_absmax_codes(...)``.

    Returns (packed uint8 ``[(n + 1) // 2]``, fp32 absmax per block), bit-identical to the simple
    path and to bitsandbytes. CPU only; other devices take the simple path. Raises `FormatError` if
    ``x`` holds NaN/Inf (seen in the block maxima, before any code is computed).

    Large inputs are split into one contiguous range of chunks per intra-op thread, each run by a
    worker thread whose ops are single-threaded: the chunks are too small to amortise an OpenMP
    fork/join per op, and on a busy machine every such join waits for the slowest thread.
    """
    if x.device.type != "cpu" or blocksize % 2:
        codes, absmax = blockwise_absmax_codes(x, blocksize, table)
        if not bool(torch.isfinite(absmax).all()):
            raise FormatError(_NON_FINITE)
        return pack_4bit(codes, pad_code=int(nearest_code(torch.zeros(1), table))), absmax
    tables = _codebook_bin_tables(table)
    flat = x.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        flat = flat.float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    nblocks = full // blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(nblocks + (1 if rem else 0), dtype=torch.float32)
    if nblocks:
        body = flat[:full].view(nblocks, blocksize)
        rows = max(1, _CHUNK_ELEMS // blocksize)
        nchunks = -(-nblocks // rows)
        workers = min(torch.get_num_threads(), nchunks)
        if workers <= 1:
            _quantize_rows_loop(body, 0, nblocks, rows, absmax, packed, tables)
        else:
            threads = torch.get_num_threads()
            per = -(-nchunks // workers) * rows
            ranges = [(r, min(nblocks, r + per)) for r in range(0, nblocks, per)]
            with ThreadPoolExecutor(len(ranges)) as ex:
                args = (rows, absmax, packed, tables, threads, torch.is_inference_mode_enabled())
                futures = [ex.submit(_quantize_rows, body, a, b, *args) for a, b in ranges]
                for f in futures:
                    f.result()  # re-raises a worker's FormatError
    if rem:
        with single_threaded():
            tail = flat[full:].float()
            am = tail.abs().amax().clamp(min=1e-38)  # bitsandbytes stores the clamped tail absmax
            if not bool(torch.isfinite(am)):
                raise FormatError(_NON_FINITE)
            absmax[nblocks] = am
            buf = _Buffers(rem + rem % 2)
            v = buf.v
            v.zero_()  # an odd count pairs the last code with the code of 0.0, as bitsandbytes
            torch.div(tail, am, out=v[:rem])  # the tail block divides (bitsandbytes)
            v.mul_(_BIN_SCALE)
            _codes_to_packed(v, packed[full // 2 :], *tables, buf)
    return packed, absmax


def blockwise_dynamic_codes(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit block-wise quantization to the signed dynamic map, as bitsandbytes' CPU library does it.

    bitsandbytes (0.50) normalises by ``x * (1 / absmax)``, maps the result to one of 65536 uniform
    bins (``trunc(((v + 1) * 0.5) * 65535 + 0.5)``) and looks the code up in a table built from
    the map's midpoints. We reproduce that table and arithmetic in fp32, so codes are identical,
    including its degenerate cases: ``1 / absmax`` is inf for an all-zero block and for a subnormal
    absmax, and a resulting NaN (0 * inf) gets code 0, +-inf the code of +-1.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    blocks = padded.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    v = blocks * (1.0 / absmax)[:, None]
    v = torch.nan_to_num(v, nan=-1.0, posinf=1.0, neginf=-1.0).clamp_(-1.0, 1.0)  # NaN -> bin 0 -> code 0
    bins = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    codes = _dynamic_bin_table(flat.device)[bins]
    return codes.view(-1)[:n], absmax


_bin_tables: dict[torch.device, torch.Tensor] = {}


def _dynamic_bin_table(device: torch.device) -> torch.Tensor:
    """Code of the nearest dynamic-map entry for each of the 65536 bins of [-1, 1]."""
    t = _bin_tables.get(device)
    if t is None:
        code = code_table("dynamic", device)
        mids = 0.5 * (code[:-1] + code[1:])
        centres = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=device)) / 65535
        t = torch.searchsorted(mids, centres, right=False).to(torch.uint8)
        _bin_tables[device] = t
    return t


def blockwise_decode(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, table: str, numel: int) -> torch.Tensor:
    """fp32 values ``table[code] * absmax[block]`` for the first ``numel`` flat codes."""
    values = code_table(table, codes.device)[codes[:numel].long()]
    return _scale_blocks(values, absmax, blocksize, numel)


def blockwise_decode_packed(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, table: str, numel: int
) -> torch.Tensor:
    """:func:`blockwise_decode` straight from packed bytes: one lookup yields both codes of a byte
    (no shift/mask/interleave passes). Bit-identical (same table values, one multiply)."""
    pairs = _pair_table(table, packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
    return _scale_blocks(pairs.view(-1)[:numel], absmax, blocksize, numel)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int) -> torch.Tensor:
    nblocks = absmax.numel()
    full = numel // blocksize
    if full == nblocks:  # no tail block: no padding copy
        return (values.reshape(nblocks, blocksize) * absmax.view(-1, 1)).view(-1)
    out = torch.empty(numel, dtype=torch.float32, device=values.device)
    body = full * blocksize
    torch.mul(values[:body].view(full, blocksize), absmax[:full].view(-1, 1), out=out[:body].view(full, blocksize))
    torch.mul(values[body:], absmax[full:], out=out[body:])
    return out


_pair_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def _pair_table(table: str, device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: the two code values a packed byte stands for (first element in the high nibble)."""
    key = (table, device)
    t = _pair_tables.get(key)
    if t is None:
        code = code_table(table, device)
        b = torch.arange(256, device=device)
        t = torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous()
        _pair_tables[key] = t
    return t
