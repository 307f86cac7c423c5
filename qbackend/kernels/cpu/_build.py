"""Build (once per machine, cached) and load the C++ CPU kernels (``*.cpp`` beside this file).

The library is plain C ABI loaded with ctypes (no libtorch, not linked with OpenMP), so it compiles in
seconds with ``g++`` and does not depend on torch's C++ headers or ABI. Its threads are torch's own
OpenMP team where torch runs on OpenMP (the runtime's entry points are handed over at load, see
:func:`set_omp`), else a small pool of its own. ISA flags are chosen from the CPU we run on
(never ``-march=native``): the cached file name holds the variant and a hash of the source, flags
and compiler, so a cache directory shared by different machines never hands out an illegal
instruction. If anything fails, :func:`load` returns None and the ops use a pure-torch path (one
warning per process).

Environment: ``QBACKEND_CPU_KERNELS=0`` disables the C++ kernels; ``QBACKEND_CACHE_DIR`` moves the
cache (default: torch's extension build root, ``~/.cache/torch_extensions``); ``CXX`` picks the
compiler (default ``g++``); ``QBACKEND_CPU_VARIANT`` forces the ISA variant (avx512, avx2, generic);
``QBACKEND_CPU_POOL=own`` keeps the library's own thread pool even where torch runs on OpenMP.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ABI_VERSION = 6
# Every C++ source beside this file goes into the one library (each kernel family in its own file;
# code for ISA extensions beyond the variant's flags uses target attributes + a run-time CPU check).
_SRCS = tuple(sorted(Path(__file__).parent.glob("*.cpp")))
_HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))  # part of the cache key, not compiled on their own

# Explicit ISA flags instead of -march=native: the binary then runs on every CPU of that class.
_VARIANTS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}
# -ffp-contract=off keeps the decode arithmetic exactly the reference's (no implicit FMA fusion).
# Not linked with OpenMP: the library borrows torch's runtime at load time (set_omp) or uses its own
# small pool (RowPool in qlinear.cpp).
_BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-math-errno"]


# QW4.layout: how a 4-bit code becomes a value (``enum Layout`` in qlinear.cpp).
CODEBOOK = 0  # nf4, fp4: table[code] * absmax[block]
INT4 = 1  # (code - zero point) * scale[group]


class QW4(ctypes.Structure):
    """Mirror of ``struct QW4`` in qlinear.cpp."""

    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("absmax", ctypes.c_void_p),
        ("ncodes", ctypes.c_void_p),
        ("nabsmax", ctypes.c_void_p),
        ("ntable", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("zp", ctypes.c_void_p),
        ("noffset", ctypes.c_void_p),
        ("layout", ctypes.c_int32),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("bs", ctypes.c_int64),
        ("nbs", ctypes.c_int64),
        ("G", ctypes.c_int64),
    ]


def cpu_variant() -> str:
    """The ISA variant this CPU runs: "avx512", "avx2" or "generic" (``QBACKEND_CPU_VARIANT`` may
    force a lower one, e.g. to test the portable build)."""
    forced = os.environ.get("QBACKEND_CPU_VARIANT")
    if forced in _VARIANTS:
        return forced
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "bmi2", "f16c"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "generic"


def _cache_dir() -> Path:
    d = os.environ.get("QBACKEND_CACHE_DIR")
    if d:
        return Path(d)
    from torch.utils.cpp_extension import get_default_build_root  # slow to import: only for the default path

    return Path(get_default_build_root()) / "qbackend"


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def library_path(variant: str) -> tuple[Path, list[str], str]:
    """(cached .so path, compile command, compiler) for ``variant``; raises RuntimeError if no compiler."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[:1]
    flags = _BASE_FLAGS + _VARIANTS[variant]
    h = hashlib.sha256()
    for part in (*(src.read_bytes() for src in (*_SRCS, *_HEADERS)), " ".join(flags).encode(), str(version).encode(),
                 str(ABI_VERSION).encode()):  # fmt: skip
        h.update(part)
    path = _cache_dir() / f"qlinear_{variant}_{h.hexdigest()[:16]}.so"
    return path, [cxx, *flags], cxx


def _compile(path: Path, cmd: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build to a private temp file and rename atomically: concurrent processes may race here.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        res = subprocess.run([*cmd, *map(str, _SRCS), "-o", tmp], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            names = ", ".join(src.name for src in _SRCS)
            raise RuntimeError(f"compiling {names} failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    qw = ctypes.POINTER(QW4)
    lib.qb_abi_version.restype = INT
    lib.qb_has_avx512.restype = INT
    lib.qb_set_nr.argtypes = [INT]
    lib.qb4_fast_ok.argtypes = [qw]
    lib.qb4_fast_ok.restype = INT
    lib.qb4_linear.argtypes = [qw, P, I64, P, P, INT, INT]
    lib.qb4_linear.restype = INT
    lib.qb4_dequant.argtypes = [qw, I64, I64, P, INT, INT]
    lib.qb4_dequant.restype = None
    lib.qb8_linear.argtypes = [P, P, I64, I64, P, I64, P, P, INT, INT]
    lib.qb8_linear.restype = INT
    lib.qb8_dequant.argtypes = [P, P, I64, I64, I64, P, INT]
    lib.qb8_dequant.restype = None
    lib.qb4_linear_panel.argtypes = [qw, P, I64, P, P, INT, I64, INT]
    lib.qb4_linear_panel.restype = INT
    lib.qb8_linear_panel.argtypes = [P, P, I64, I64, P, I64, P, P, INT, I64]
    lib.qb8_linear_panel.restype = INT
    lib.qb4_grad_panel.argtypes = [qw, P, I64, P, INT, I64, INT]
    lib.qb4_grad_panel.restype = INT
    lib.qb8_grad_panel.argtypes = [P, P, I64, I64, P, I64, P, INT, I64]
    lib.qb8_grad_panel.restype = INT
    lib.qb_panel_threads.argtypes = [I64, I64, INT]
    lib.qb_panel_threads.restype = INT
    lib.qb_set_blas.argtypes = [P, P]
    lib.qb_set_blas.restype = INT
    lib.qb_set_omp.argtypes = [P, P, P]
    lib.qb_set_omp.restype = INT
    lib.qb_omp_stats.argtypes = [P]
    lib.qb_omp_stats.restype = None
    lib.qb_set_omp_skip_min.argtypes = [I64]
    lib.qb_set_omp_skip_min.restype = None
    lib.qb_all_finite.argtypes = [P, I64]
    lib.qb_all_finite.restype = INT
    lib.qb_decode_attention.argtypes = [P] * 6 + [INT, ctypes.c_float, INT, INT]
    lib.qb_decode_attention.restype = INT
    lib.qb_decode_attention_trimmed.argtypes = []
    lib.qb_decode_attention_trimmed.restype = I64


@functools.cache
def has_blas() -> bool:
    """Hand torch's own BLAS to the library (see :func:`set_blas`); False without the library or BLAS:
    the large-M paths then multiply panels with torch.mm in Python."""
    lib = load()
    return lib is not None and set_blas(lib)


def torch_cpu_symbols(*names: str) -> tuple[int, ...] | None:
    """Addresses of these symbols in torch's libtorch_cpu (MKL's in x86 wheels), or None if any is absent."""
    import torch  # this module builds without torch (a build script); only the lookups need it

    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return tuple(ctypes.cast(getattr(torch_cpu, n), ctypes.c_void_p).value for n in names)
    except (OSError, AttributeError):
        return None


def set_blas(lib: ctypes.CDLL) -> bool:
    """Hand ``lib`` the Fortran ``sgemm_`` and ``MKL_Set_Num_Threads_Local`` that libtorch_cpu exports
    (MKL in x86 wheels), after a small check multiply. False if they are absent (other BLAS builds)."""
    # MKL_Set_Num_Threads_Local: the C interface (int by value); sgemm_ is the Fortran one.
    found = torch_cpu_symbols("sgemm_", "MKL_Set_Num_Threads_Local")
    if found is None:
        return False
    ok = bool(lib.qb_set_blas(*found))
    if not ok:
        log.info("qbackend: torch's sgemm_ failed the check multiply; large-M CPU linears use torch.mm")
    return ok


# Shared-object names of the OpenMP runtimes torch may be built with (GNU, LLVM, Intel).
_OMP_LIBS = ("libgomp", "libomp", "libiomp5")


def omp_entry_points() -> tuple[int, int, int] | None:
    """Addresses of ``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_in_parallel`` in the OpenMP
    runtime this process's torch runs on, or None (torch not on OpenMP, or no runtime found)."""
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:  # the runtime torch loaded (its wheels bundle libgomp under a hashed name)
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if Path(path).name.startswith(_OMP_LIBS):
            try:
                rt = ctypes.CDLL(path)
                names = ("GOMP_parallel", "omp_get_thread_num", "omp_in_parallel")
                return tuple(ctypes.cast(getattr(rt, n), ctypes.c_void_p).value for n in names)
            except (OSError, AttributeError):
                continue
    return None


def set_omp(lib: ctypes.CDLL, use: bool | None = None) -> bool:
    """Run ``lib``'s kernel threads on torch's OpenMP team (``use`` None: unless
    ``QBACKEND_CPU_POOL=own``); False: the library's own pool. Returns whether the team is in use."""
    if use is None:
        use = os.environ.get("QBACKEND_CPU_POOL", "") != "own"
    found = omp_entry_points() if use else None
    return bool(lib.qb_set_omp(*(found or (None, None, None))))


@functools.cache
def load_variant(variant: str) -> ctypes.CDLL:
    """The library built for ``variant`` ("avx512", "avx2", "generic"; built once, cached on disk).

    Raises on failure. Loading a variant this CPU cannot run is fine; calling into it is not.
    """
    path, cmd, _ = library_path(variant)
    if not path.exists():
        log.info("qbackend: compiling CPU kernels (%s) -> %s", variant, path)
        _compile(path, cmd)
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if lib.qb_abi_version() != ABI_VERSION:
        raise RuntimeError(f"stale kernel library {path} (ABI {lib.qb_abi_version()} != {ABI_VERSION})")
    set_omp(lib)
    return lib


def disabled() -> bool:
    """Whether ``QBACKEND_CPU_KERNELS=0`` turns the C++ kernels off."""
    return os.environ.get("QBACKEND_CPU_KERNELS", "1") == "0"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library (built on first use, then cached on disk), or None if unavailable."""
    if disabled():
        log.info("qbackend: C++ CPU kernels disabled by QBACKEND_CPU_KERNELS=0")
        return None
    try:
        return load_variant(cpu_variant())
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning(
            "qbackend: C++ CPU kernels unavailable (%s); using the slower pure-torch path", str(e).splitlines()[0]
        )
        log.debug("qbackend: kernel build failure details", exc_info=True)
        return None
