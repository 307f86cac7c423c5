"""Kernel configurations: heuristics, autotuning and a per-GPU on-disk cache of the chosen configs.

``triton.autotune`` is not used: its key cannot hold our (M bucket, format, block size) key directly,
it cannot be bypassed per call under the interpreter, and it keeps no cache across processes.

* Key: (variant, format, block size, nested, zero point, activation dtype, M bucket, N, K).
* Off under the interpreter, while a CUDA graph is being captured, and when
  ``QBACKEND_TRITON_AUTOTUNE=0``: a fixed heuristic config is used (nothing is cached then).
* Cache: ``$QBACKEND_TRITON_CACHE_DIR`` (default ``~/.cache/qbackend/triton``), one JSON file per
  GPU model, compute capability and Triton version.
* Tests (and benchmarks) can pin a config with :func:`override_config`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

# Variant names (the launcher picks one by M).
GEMV = "wo_gemv"  # weight-only, M == 1: split-K, no tl.dot
GEMV_WIDE = "wo_gemv_wide"  # weight-only, M <= WIDE_M_MAX: K tiles spanning several blocks, no tl.dot
WO_SMALL = "wo_small"  # weight-only, 2 <= M <= 64: tl.dot, M padded to 16, split-K
DOT_WIDE = "wo_dot_wide"  # codebook weight-only, small M: tl.dot with K tiles spanning several blocks
WO_LARGE = "wo_large"  # weight-only, M > 64: tiled GEMM, grouped program order
GRAD_SMALL = "wo_grad_small"  # grad_x, M <= 64: split over N
GRAD_LARGE = "wo_grad_large"
W8A8_SMALL = "w8a8_small"
W8A8_LARGE = "w8a8_large"
VARIANTS = (GEMV, GEMV_WIDE, WO_SMALL, DOT_WIDE, WO_LARGE, GRAD_SMALL, GRAD_LARGE, W8A8_SMALL, W8A8_LARGE)

SMALL_M_MAX = 64
WIDE_M_MAX = 4
T = TypeVar("T")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters. ``split`` divides the reduction axis (K, or N for grads)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2


def m_bucket(m: int) -> int:
    """Power-of-two bucket of M (1, 2, 4, ... 4096); configs are tuned once per bucket."""
    if m <= 1:
        return 1
    return min(1 << (m - 1).bit_length(), 4096)


def block_m_for(m: int) -> int:
    """Smallest tile height that holds M rows, at least 16 (tl.dot's minimum), at most 64."""
    return max(16, min(64, 1 << max(m - 1, 1).bit_length()))


# ---------------------------------------------------------------------------------------------
# overrides (tests, benchmarks)
# ---------------------------------------------------------------------------------------------

_overrides: dict[str, KernelConfig] = {}


@contextlib.contextmanager
def override_config(variant: str, cfg: KernelConfig) -> Iterator[None]:
    """Use ``cfg`` for every launch of ``variant`` inside the block (no autotuning, no cache)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    old = _overrides.get(variant)
    _overrides[variant] = cfg
    try:
        yield
    finally:
        if old is None:
            _overrides.pop(variant, None)
        else:
            _overrides[variant] = old


# ---------------------------------------------------------------------------------------------
# fixed configs: the interpreter's (tiny tiles, so tests exercise masking and splits) and the GPU
# heuristic used when autotuning is off
# ---------------------------------------------------------------------------------------------


def interpreter_config(variant: str, m: int) -> KernelConfig:
    """One fixed small config per variant: the interpreter cannot autotune and is slow."""
    if variant == GEMV:
        return KernelConfig(block_m=1, block_n=32, block_k=32, split=2)
    if variant == GEMV_WIDE:
        return KernelConfig(block_m=wide_block_m(m), block_n=16, block_k=64, split=2)
    if variant in (WO_SMALL, GRAD_SMALL, W8A8_SMALL):
        return KernelConfig(block_m=block_m_for(m), block_n=32, block_k=32, split=2, group_m=1)
    if variant == DOT_WIDE:
        return KernelConfig(block_m=block_m_for(m), block_n=16, block_k=128, split=2, group_m=1)
    return KernelConfig(block_m=32, block_n=32, block_k=32, split=1, group_m=2)


_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_counts:
        _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_counts[idx]


def split_for(tiles: int, depth: int, block: int, sms: int, max_split: int = 32, per_sm: int = 4) -> int:
    """Split the reduction until the grid has about ``per_sm`` programs per SM, keeping >= 2 tiles per split."""
    split = 1
    while tiles * split < per_sm * sms and split * 2 <= max_split and depth // (block * split * 2) >= 2:
        split *= 2
    return split


def wide_block_m(m: int) -> int:
    """Rows of x per wide-GEMV program: all of M (a power of two, at most WIDE_M_MAX)."""
    return 1 << max(min(m, WIDE_M_MAX) - 1, 0).bit_length()


def _wide_warps(block_n: int, block_k: int, byte_cols: int) -> int:
    """Warps for a wide-GEMV tile: about 32 bytes of weights per thread and iteration."""
    nbytes = block_n * block_k // byte_cols
    return 8 if nbytes >= 16384 else 4 if nbytes >= 4096 else 2


def wide_block_ks(k: int, byte_cols: int) -> list[int]:
    """K tiles of the wide GEMV: 256..1024 columns (4-bit, ``byte_cols`` 2) or 128..512 (int8),
    none much wider than K itself."""
    top = max(16, 1 << max(k - 1, 1).bit_length())
    base = (256, 512, 1024) if byte_cols == 2 else (128, 256, 512)
    return sorted({min(b, top) for b in base})


def dot_wide_block_k(k: int, block_k: int) -> int:
    """A wide-dot K tile of ``block_k`` columns, none much wider than K (at least 32: tl.dot's depth of 16
    per half-depth dot)."""
    return max(32, min(block_k, 1 << max(k - 1, 1).bit_length()))


def dot_wide_config(
    m: int, n: int, k: int, block_n: int, block_k: int, warps: int, sms: int, stages: int = 1
) -> KernelConfig:
    """A wide-dot config with the given weight tile: BLOCK_M holds M (up to 64), split-K until about two
    programs per SM (a wide K tile is a lot of work per step already).

    One stage by default: with more, Triton's pipeliner turns every per-element table gather into a
    4-byte async copy through shared memory (sm_90 SASS: LDGSTS + LDS per code instead of an L1-hit
    LDG); the kernel prefetches the next tile's codes itself."""
    bm, bk = block_m_for(m), dot_wide_block_k(k, block_k)
    split = split_for(-(-n // block_n) * -(-m // bm), k, bk, sms, per_sm=2)
    return KernelConfig(bm, block_n, bk, split, 1, max(warps, 8 if bm >= 64 else 4), stages)


def dot_wide_tile(m: int, fp32: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) of the wide dot's heuristic. Each program re-reads its [M, BLOCK_K] slice
    of x per N tile, 4 * M / BLOCK_N times the weight bytes in all (L2 traffic), so N tiles widen with M;
    the decoded tile (fp32 before the dot) keeps to ~64 values per thread: sm_90 compiles (aot.py, one
    stage) of 32 x 256 with 4 warps, 64 x 256 and 128 x 128 with 8 take 220-253 registers without spills,
    while 128 x 256 or 512-column tiles spill. fp32 activations (IEEE dots on CUDA cores) need smaller tiles."""
    if fp32:
        return (32, 128, 4) if m <= 16 else (32, 64, 8)
    if m <= 8:
        return 32, 256, 4
    if m <= 16:
        return 64, 256, 8
    return 128, 128, 8


def heuristic_config(variant: str, m: int, n: int, k: int, bk_cap: int, sms: int) -> KernelConfig:
    """A reasonable untuned config for an [M, K] x [K, N] problem (grads: output [M, K], reduction N).

    ``bk_cap`` bounds ``block_k`` so that K tiles stay inside one constant block (aligned path);
    for GEMV_WIDE it is the number of weight columns per byte instead (2: 4-bit, 1: int8); DOT_WIDE
    ignores it (its K tiles span blocks).
    """
    cap = lambda b: max(16, min(b, bk_cap))
    cdiv = lambda a, b: -(-a // b)
    if variant == GEMV_WIDE:
        # 4-bit when bk_cap is 2 (columns per byte), int8 when 1: 256 bytes per row per step.
        bm, bn = wide_block_m(m), 16
        bk = wide_block_ks(k, bk_cap)[1 if len(wide_block_ks(k, bk_cap)) > 1 else 0]
        split = split_for(cdiv(n, bn), k, bk, sms)
        return KernelConfig(bm, bn, bk, split, 1, _wide_warps(bn, bk, bk_cap), 2)
    if variant == DOT_WIDE:
        return dot_wide_config(m, n, k, *dot_wide_tile(m), sms)
    if variant == GEMV:
        bn, bk = 64, cap(128)
        return KernelConfig(1, bn, bk, split_for(cdiv(n, bn), k, bk, sms), 1, 4, 2)
    if variant == WO_SMALL:
        bm, bn, bk = block_m_for(m), 64, cap(64)
        return KernelConfig(bm, bn, bk, split_for(cdiv(n, bn) * cdiv(m, bm), k, bk, sms), 1, 4, 3)
    if variant == GRAD_SMALL:
        bm, bn, bk = block_m_for(m), 64, cap(64)  # output tile along K, reduction steps along N
        return KernelConfig(bm, bn, bk, split_for(cdiv(k, bk) * cdiv(m, bm), n, bn, sms), 1, 4, 3)
    if variant == W8A8_SMALL:
        bm, bn, bk = block_m_for(m), 64, 128
        return KernelConfig(bm, bn, bk, split_for(cdiv(n, bn) * cdiv(m, bm), k, bk, sms), 1, 4, 3)
    if variant == W8A8_LARGE:
        return KernelConfig(128, 128, 128, 1, 8, 8, 3)
    if variant == GRAD_LARGE:
        return KernelConfig(128, 64, cap(64), 1, 8, 4, 3)
    return KernelConfig(128, 128, cap(64), 1, 8, 8, 3)


def candidate_configs(variant: str, m: int, n: int, k: int, bk_cap: int, sms: int) -> list[KernelConfig]:
    """The autotuner's search space, pruned to what the shape and the aligned path allow.

    Kept to about a dozen configs per key: every distinct tile/warp/stage choice is a compile
    (~1 s each), and a first run over many shapes must stay within minutes. ``split`` only changes
    a run-time argument, so trying two split factors costs no extra compile.
    """
    cdiv = lambda a, b: -(-a // b)
    bks = sorted({max(16, min(b, bk_cap)) for b in (32, 64, 128, 256)})
    big = [b for b in bks if b >= 32][-2:]  # the two largest K tiles allowed
    out: list[KernelConfig] = []
    if variant == GEMV_WIDE:  # bk_cap carries columns per byte (2: 4-bit, 1: int8), see linear.py
        bm = wide_block_m(m)
        for bk in wide_block_ks(k, bk_cap):
            for bn in (8, 16, 32):
                base = split_for(cdiv(n, bn), k, bk, sms)
                for split in sorted({base, base * 2}) if bn == 16 else [base]:
                    out.append(KernelConfig(bm, bn, bk, split, 1, _wide_warps(bn, bk, bk_cap), 2))
    elif variant == DOT_WIDE:
        for bn, bk, warps in ((32, 256, 4), (32, 128, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8), (16, 256, 4)):
            for stages in (1, 2):
                out.append(dot_wide_config(m, n, k, bn, bk, warps, sms, stages))
    elif variant == GEMV:
        for bn in (32, 64, 128):
            for bk in bks[-2:]:
                base = split_for(cdiv(n, bn), k, bk, sms)
                for split in sorted({base, base * 2}):
                    out.append(KernelConfig(1, bn, bk, split, 1, 4 if bn * bk >= 4096 else 2, 2))
    elif variant in (WO_SMALL, W8A8_SMALL):
        bm = block_m_for(m)
        kbs = big if variant == WO_SMALL else [128, 256]
        for bn in (32, 64, 128):
            for bk in kbs:
                base = split_for(cdiv(n, bn) * cdiv(m, bm), k, bk, sms)
                for split in sorted({base, base * 2}):
                    out.append(KernelConfig(bm, bn, bk, split, 1, 4, 3))
    elif variant == GRAD_SMALL:
        bm = block_m_for(m)
        for bk in big:
            for bn in (32, 64, 128):
                base = split_for(cdiv(k, bk) * cdiv(m, bm), n, bn, sms)
                for split in sorted({base, base * 2}):
                    out.append(KernelConfig(bm, bn, bk, split, 1, 4, 3))
    elif variant == GRAD_LARGE:
        for bm, bn, nw in ((64, 64, 4), (128, 64, 4), (128, 32, 4), (128, 64, 8)):
            for bk in [b for b in bks if 32 <= b <= 128][-2:]:
                out.append(KernelConfig(bm, bn, bk, 1, 8, nw, 3))
    else:
        kbs = [b for b in bks if 32 <= b <= 64] if variant == WO_LARGE else [64, 128]
        for bm, bn, nw in ((64, 128, 4), (128, 64, 4), (128, 128, 8), (128, 256, 8), (64, 256, 4)):
            for bk in kbs:
                out.append(KernelConfig(bm, bn, bk, 1, 8, nw, 3))
        out.append(KernelConfig(128, 128, kbs[-1], 1, 8, 8, 4))
    return out


# ---------------------------------------------------------------------------------------------
# on-disk cache
# ---------------------------------------------------------------------------------------------

_CACHE_VERSION = 1
_mem: dict[Path, dict[str, KernelConfig]] = {}
_cache_lock = threading.Lock()


def autotune_enabled() -> bool:
    return os.environ.get("QBACKEND_TRITON_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    env = os.environ.get("QBACKEND_TRITON_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "qbackend" / "triton"


_files: dict[tuple[str | None, int], Path] = {}


def cache_file(device: torch.device) -> Path:
    """One file per GPU model, compute capability and Triton version (configs do not transfer)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    where = os.environ.get("QBACKEND_TRITON_CACHE_DIR")
    path = _files.get((where, idx))
    if path is None:  # once per GPU: these device queries cost more than a kernel launch
        import triton  # triton is optional (CUDA)

        gpu = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(idx)).strip("_")
        major, minor = torch.cuda.get_device_capability(idx)
        path = _files[(where, idx)] = cache_dir() / f"{gpu}-sm{major}{minor}-triton{triton.__version__}.json"
    return path


def _load(path: Path) -> dict[str, KernelConfig]:
    try:
        data = json.loads(path.read_text())
        if data.get("version") != _CACHE_VERSION:
            return {}
        return {k: KernelConfig(**v) for k, v in data.get("configs", {}).items()}
    except (OSError, ValueError, TypeError):
        return {}  # a missing or corrupt cache only costs a re-tune


def _store(path: Path, key: str, cfg: KernelConfig) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = _load(path)  # another process may have added entries since we read it
        merged[key] = cfg
        payload = {"version": _CACHE_VERSION, "configs": {k: asdict(v) for k, v in sorted(merged.items())}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)  # atomic: readers never see a half-written file
    except OSError:
        pass  # read-only home etc.: keep the in-memory choice


def make_key(
    variant: str, layout: str, bs: int, nested: bool, has_zp: bool, dtype: torch.dtype, m: int, n: int, k: int
) -> str:
    """Cache key of a tuned config; ``layout`` is the kernel stem ("codebook" serves nf4 and fp4)."""
    dt = str(dtype).removeprefix("torch.")
    return f"{variant}|{layout}|bs{bs}|nest{int(nested)}|zp{int(has_zp)}|{dt}|M{m_bucket(m)}|N{n}|K{k}"


def select_config(
    variant: str,
    key: str,
    device: torch.device,
    interpreted: bool,
    m: int,
    default: Callable[[], KernelConfig],
    candidates: Callable[[], list[KernelConfig]],
    bench: Callable[[KernelConfig], object],
) -> KernelConfig:
    """Config for one launch: override > interpreter's fixed one > cached > tuned now > heuristic.

    Tuning runs each candidate on the real operands (outputs are fresh allocations, so this is safe).
    """
    if variant in _overrides:
        return _overrides[variant]
    if interpreted:
        return interpreter_config(variant, m)
    path = cache_file(device)
    with _cache_lock:
        table = _mem.get(path)
        if table is None:
            table = _mem[path] = _load(path)
        hit = table.get(key)
    if hit is not None:
        return hit
    if not autotune_enabled() or torch.cuda.is_current_stream_capturing():
        # Never benchmark inside a graph capture: the launches would be recorded, not run.
        return default()
    best = tune(candidates(), bench) or default()
    with _cache_lock:
        table[key] = best
        _store(path, key, best)
    return best


def shrink(cfg: KernelConfig) -> KernelConfig | None:
    """A smaller version of ``cfg`` (fewer pipeline stages, then narrower tiles), None at the floor.

    Used when a config needs more shared memory than the GPU has (e.g. the per-element constant
    path pipelines full fp32 constant tiles).
    """
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_n > 32:
        return replace(cfg, block_n=cfg.block_n // 2, num_stages=2)
    if cfg.block_m > 16:
        return replace(cfg, block_m=cfg.block_m // 2, num_stages=2)
    return None


def launch_fitting(key: str, device: torch.device, cfg: KernelConfig, launch: Callable[[KernelConfig], T]) -> T:
    """``launch(cfg)``, shrinking the config while the kernel does not fit the GPU's resources.

    The config that fits replaces ``cfg`` in the in-memory cache, so the retry happens once per key.
    """
    from triton.runtime.errors import OutOfResources  # triton is optional (CUDA)

    shrunk = False
    while True:
        try:
            out = launch(cfg)
        except OutOfResources:
            smaller = shrink(cfg)
            if smaller is None:
                raise
            cfg, shrunk = smaller, True
            continue
        if shrunk and device.type == "cuda":
            with _cache_lock:
                _mem.setdefault(cache_file(device), {})[key] = cfg
        return out


def tune(cands: list[KernelConfig], bench: Callable[[KernelConfig], object]) -> KernelConfig | None:
    """The fastest config by median time (L2 flushed by do_bench); configs that fail are skipped."""
    from triton.testing import do_bench  # triton is optional (CUDA)

    best: tuple[float, KernelConfig] | None = None
    for cfg in dict.fromkeys(cands):  # dedupe, keep order
        try:
            t = do_bench(lambda c=cfg: bench(c), warmup=5, rep=25, return_mode="median")
        except Exception:  # noqa: BLE001 - e.g. out of shared memory for this tile: just not a candidate
            continue
        if best is None or t < best[0]:
            best = (t, cfg)
    return None if best is None else best[1]


def clear_memory_cache() -> None:
    with _cache_lock:
        _mem.clear()


__all__ = [
    "DOT_WIDE",
    "GEMV",
    "GEMV_WIDE",
    "GRAD_LARGE",
    "GRAD_SMALL",
    "KernelConfig",
    "VARIANTS",
    "W8A8_LARGE",
    "W8A8_SMALL",
    "WO_LARGE",
    "WO_SMALL",
    "autotune_enabled",
    "cache_file",
    "candidate_configs",
    "dot_wide_config",
    "dot_wide_tile",
    "heuristic_config",
    "interpreter_config",
    "launch_fitting",
    "make_key",
    "m_bucket",
    "override_config",
    "select_config",
    "shrink",
]
