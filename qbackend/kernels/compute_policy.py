"""Which arithmetic (``compute`` mode) a weight-only layer runs in: the ``compute`` option resolved per layer.

The option is ``"auto"`` (default) or one of :data:`~qbackend.kernels.spec.COMPUTE_MODES` ("fp32",
"bf16", "int8", "int16"; their numerics are defined in :mod:`qbackend.kernels.reference`). It is resolved
here, once per layer when a model is compiled or its modules are swapped, never inside an op:

* ``"fp32"``: always (exact; every device).
* an explicit ``"bf16"`` / ``"int8"`` on a CPU: needs the instructions of that mode
  (:data:`REQUIRED_FEATURES`); without them :class:`ComputeUnavailable` names what the CPU lacks
  and the modes it supports. With them the mode runs even where no fast kernel covers the layer
  (the reference numerics, correct and slow; logged once). On CUDA explicit modes run the
  reference numerics too (the Triton kernels compute in fp32; logged once).
* ``"auto"``: the fastest mode that (1) keeps the added output error within :data:`ERROR_BOUND`
  of the format's own quantization error on real activations (:data:`AUTO_MODES`, measured
  below), (2) the CPU has the instructions for and (3) has a fast kernel for this layer
  (``qbackend.kernels.cpu.compute.has_fast_kernel``); otherwise "fp32" (the fallback is logged
  once per reason). On CUDA: "fp32" (today's Triton kernels).

Measured (``benchmarks/measure_compute_error.py``: every linear layer of all-MiniLM-L6-v2 on its real
inputs from 64 held-out demo sentences; "added" is a mode's reference numerics against exact fp32
compute on the same quantized weight, "own" the format's output error against the float layer,
both relative to ``||x W^T||``; all layers together = root sum of squares over layers; cosine:
the whole model's mean embedding cosine against the float model, every layer in that mode):

| format | mode | added/own: median layer | worst layer | all layers | embedding cosine: fp32 -> mode |
|---|---|---:|---:|---:|---|
| nf4 | int8 | 0.106 | 0.133 | 0.101 | 0.97401 -> 0.97365 |
| nf4 | bf16 (W rounded too) | 0.025 | 0.123 | 0.026 | 0.97401 -> 0.97395 (x, table rounded) |
| fp4 | int8 | 0.070 | 0.101 | 0.071 | 0.95047 -> 0.95294 |
| fp4 | bf16 (W rounded too) | 0.019 | 0.089 | 0.019 | 0.95047 -> 0.95052 |
| int4 g128 | int8 | 0.072 | 0.095 | 0.073 | 0.96083 -> 0.96093 |
| int4 g64 | int8 | 0.081 | 0.107 | 0.082 | 0.96867 -> 0.96877 |
| int4 g64/g128 | bf16 (W rounded too) | 0.025 | 0.089 | 0.024 | unchanged to 1e-5 |
| int8 | int8 | 0.927 | 1.333 | 0.942 | 0.99962 -> 0.99941 |
| int8 | bf16 (W rounded too) | 0.294 | 0.574 | 0.290 | 0.99962 -> 0.99962 (x rounded) |

The same figures on 128 of the demo's training sentences (other data) differ by at most 0.001
(nf4 int8: 0.102). The rule: "auto" may use a mode for a format when its all-layers ratio is at
most :data:`ERROR_BOUND` = 0.11, i.e. about 1/10 (the format's error grows by at most 0.6 % in
quadrature), a tenth plus the spread between the two measured sentence sets;
:data:`MEASURED_RATIO` holds those figures (int4: the worse of g64/g128; bf16: the worse of x-only
and weight-also rounding) and :data:`AUTO_MODES` follows from them:

* fp4 and int4 layers: "int8", else "bf16";
* nf4 layers: "int8" (0.101-0.102: within about 1/10, not within a strict 0.100; half of it is
  the int8 image of the NF4 code table, ``reference.int8_table``, and a more exact image would
  bring it to the int4 figure, ~0.08; the whole-model cosine moves 0.0004), else "bf16";
* int8-weight layers: "int16" (int16 activations, one scale per row): their own error is so small
  (7e-3) that int8 activations (0.94 of it) and bf16 (0.29) add far more than a tenth; int16 adds
  0.0095 (measured like the table above, ``INT16_BLOCK`` None; 0.0062 with a scale per 128 of K),
  else "fp32" — also on CPUs whose int16 kernels are the AVX2 width: no faster than the fp32 int8
  kernel there (:func:`_faster_than_fp32`), so "auto" keeps the exact arithmetic.

"int16" for the 4-bit formats (their NF4/FP4 table through the int8 image, as "int8"): nf4 0.056,
fp4 0.035, int4 0.0008 (the table image is what remains). Allowed, but only int8 weights have an
int16 kernel, so "auto" picks it for no 4-bit layer (:func:`_fast`).

Speed order when several are allowed: "int8" (VNNI: 4 multiply-adds per 32-bit lane per
instruction) before "int16" (``vpdpwssd``: 2 per lane; AVX2 ``vpmaddwd``) before "bf16" (2 per lane,
plus the decode to bf16; int16 vs bf16 was measured for no format, since no format has both kernels)
before "fp32".

Per call, by the number of rows M (tokens): a layer's mode is resolved once, but where a mode's
kernel is measurably slower than the exact fp32 kernel at some M, "auto" runs those calls in fp32
(:func:`call_mode`, :data:`AUTO_FP32_ROWS`; never for an explicit mode). That only ever moves a
call to the more exact arithmetic, so the error bound holds for every call; a row's result can then
differ between batch sizes by at most the mode's added error. The module form checks M per call
(one comparison); the compile path chooses per call site when M is static, else keeps the layer's mode.

Measured (one thread, CPU time, ratio to fp32 ``F.linear``; nf4 layers, int8 compute vs fp32 compute):
int8 loses only at M = 1 on MiniLM's shapes (384x384 0.47x vs 0.67x, 1536x384 1.14x vs 1.40x,
384x1536 1.31x vs 1.37x) and at M = 2 on 384x384 (0.76x vs 0.87x); from M = 4 it wins (up to 4.8x vs
1.7x). At 4096x4096, M = 1, int8 wins (14.0x vs 11.4x), so the loss depends on the shape, and
:data:`AUTO_FP32_ROWS` has no entry for nf4 (a rule by M alone would slow LLM decoding down).
int8-weight layers: int8 compute loses at M = 2-12 on these shapes, but "auto" keeps them out of int8.
int8-weight layers in "int16" (one thread, CPU time, vs the exact fused fp32 int8 kernel, which is
strong at small M): on AVX512-VNNI with the packed weight copy (``int16_compute.PACKING``, the
default) int16 wins at every M (the prepared calls of both, 2026-12-04, load 2-2.6: 384x384 1.4x at
M = 1, 1.9x at M = 8, 2.3x at M = 24; 384->1536 1.8x / 2.2x / 2.6x; 1536->384 1.8x / 1.9x / 2.0x;
4096x4096 2.5x / 2.0x / 2.1x; never below 1.37x for M = 1..64), so no row count runs in fp32 there.
Without it (the canonical kernels, ``benchmarks/bench_cpu_int16_cputime.py``; the AVX2 kernels,
0.67-1.14x of the AVX2 fp32 kernel at M = 1..64 on these shapes): from M = 64 int16 wins (4096x4096
1.4x at M = 64, 2.7x at M = 480; 384->1536 1.6x at M = 64, 2.4x at M = 256); at M = 1-16 about even
(runs disagree between -20% and +20%); at M = 24 it loses (0.69x: a half-empty 16-row group). So
there "auto" runs int8-weight calls of 8..32 rows in fp32 (:data:`AUTO_FP32_ROWS`, conservative).
Cold weights (LLM decode, ``benchmarks/bench_gemv_cold.py``, 2 threads, M = 1): with the small-M
kernel's software prefetch the nf4 int8 kernel is faster than fp32 at K = 5632 and on the 32000x2048
head and within a loaded machine's noise at 4096x4096, 2048x2048 and 5632x2048 (before the prefetch it
lost everywhere), so no rule by M is set for decoding either.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from .spec import COMPUTE_MODES, DEFAULT_COMPUTE

log = logging.getLogger("qbackend")

#: the values of the ``compute`` option: "auto" plus the op modes
COMPUTE_OPTIONS: tuple[str, ...] = ("auto", *COMPUTE_MODES)
DEFAULT_OPTION = "auto"
#: the formats the option applies to (the weight-only op families)
COMPUTE_FAMILIES: tuple[str, ...] = ("nf4", "fp4", "int4", "int8")
#: "auto" allows a mode when its added output error is at most this fraction of the format's own
#: error (all layers of the measured model together)
ERROR_BOUND = 0.11
#: added / own output error of each (format, mode), all MiniLM layers together (table above)
MEASURED_RATIO: Mapping[tuple[str, str], float] = {
    ("nf4", "int8"): 0.101, ("nf4", "bf16"): 0.026,
    ("fp4", "int8"): 0.071, ("fp4", "bf16"): 0.019,
    ("int4", "int8"): 0.082, ("int4", "bf16"): 0.024,
    ("int8", "int8"): 0.942, ("int8", "bf16"): 0.290,
    ("nf4", "int16"): 0.056, ("fp4", "int16"): 0.035, ("int4", "int16"): 0.0008, ("int8", "int16"): 0.0095,
}  # fmt: skip
#: speed order of the faster modes (fastest first)
FAST_MODES: tuple[str, ...] = ("int8", "int16", "bf16")
#: modes "auto" may pick per format, fastest first (ratio within ERROR_BOUND)
AUTO_MODES: Mapping[str, tuple[str, ...]] = {
    f: tuple(m for m in FAST_MODES if MEASURED_RATIO[(f, m)] <= ERROR_BOUND) for f in ("nf4", "fp4", "int4", "int8")
}
#: CPU flags (as /proc/cpuinfo spells them) a mode needs: any one of the alternatives
REQUIRED_FEATURES: Mapping[str, tuple[tuple[str, ...], str]] = {
    "int8": (("avx512_vnni", "avx_vnni", "amx_int8"), "AVX512-VNNI or AVX-VNNI (int8 dot products)"),
    "bf16": (("avx512_bf16", "amx_bf16"), "AVX512-BF16 or AMX-BF16 (bf16 dot products)"),
    "int16": (("avx2",), "AVX2 (16-bit integer multiply-adds)"),
}


#: (format, mode) -> (lowest, highest) row count M at which "auto" runs a call in "fp32" instead of
#: ``mode``: that mode's kernel is slower than the fp32 kernel there (measurements in the module
#: docstring). Formats/modes not listed: the mode at every M. Not applied where a faster kernel of the
#: mode runs that wins at every M (:func:`_wins_at_every_m`: int8 weights in "int16" on the packed copy).
AUTO_FP32_ROWS: Mapping[tuple[str, str], tuple[int, int]] = {("int8", "int16"): (8, 32)}


def fp32_rows(option: str, family: str, mode: str) -> tuple[int, int] | None:
    """The row counts at which a layer of ``family`` resolved to ``mode`` from ``option`` runs a call in
    fp32 instead (None: never; an explicit mode always runs as asked)."""
    if option != "auto" or mode == "fp32":
        return None
    span = AUTO_FP32_ROWS.get((family, mode))
    return None if span is None or _wins_at_every_m(family, mode) else span


def _wins_at_every_m(family: str, mode: str) -> bool:
    """Whether this machine runs ``family`` layers in ``mode`` on a kernel measured faster than fp32 at every
    M: int8 weights in "int16" on the packed weight copy (AVX512-VNNI, ``int16_compute.PACKING``)."""
    if (family, mode) != ("int8", "int16"):
        return False
    from .cpu import int16_compute  # the CPU kernels load their library on import: only when asked

    return int16_compute.packs()


def call_mode(option: str, family: str, mode: str, rows: int) -> str:
    """The arithmetic of one call of ``rows`` rows (M) of a layer resolved to ``mode`` from ``option``."""
    span = fp32_rows(option, family, mode)
    return "fp32" if span is not None and span[0] <= rows <= span[1] else mode


class ComputeUnavailable(ValueError):
    """An explicit ``compute`` mode this machine cannot run; the message says what is missing."""


@dataclass(frozen=True)
class Resolved:
    """A layer's compute: ``mode`` (an op argument) and, when it differs from what was asked, why."""

    mode: str
    note: str = ""


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's instruction-set flags that matter here (detected once; empty when unknown)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:  # not Linux: ask torch what it dispatches to (AVX512 implies no more than F/BW/VL/DQ)
        pass
    if not flags:
        try:
            import torch

            if torch.backends.cpu.get_cpu_capability() == "AVX512":
                flags.add("avx512f")
        except Exception:  # pragma: no cover - a torch without the query
            pass
    wanted = {f for alts, _ in REQUIRED_FEATURES.values() for f in alts} | {"avx512f", "avx2"}
    return frozenset(flags & wanted)


def cpu_modes(features: frozenset[str] | None = None) -> tuple[str, ...]:
    """The modes this CPU has the instructions for (always "fp32")."""
    feats = cpu_features() if features is None else features
    return tuple(m for m in COMPUTE_MODES if m not in REQUIRED_FEATURES or _has(m, feats))


def _has(mode: str, feats: frozenset[str]) -> bool:
    return any(f in feats for f in REQUIRED_FEATURES[mode][0])


def check_option(value: object) -> str:
    """``value`` if it is a valid ``compute`` option, else ValueError listing the valid ones."""
    if value not in COMPUTE_OPTIONS:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_OPTIONS)}; got {value!r:.40}")
    return value  # type: ignore[return-value]


def resolve(requested: str, family: str, ints: Mapping[str, int], device_type: str = "cpu") -> Resolved:
    """The mode a layer of op family ``family`` (nf4, fp4, int4, int8) with op ints ``ints``
    (out_features, in_features, blocksize/groupsize...) runs in on ``device_type`` for the option ``requested``.

    Raises :class:`ComputeUnavailable` for an explicit mode the CPU lacks the instructions for.
    """
    check_option(requested)
    if family not in COMPUTE_FAMILIES:
        raise ValueError(f"compute applies to the weight-only formats ({', '.join(COMPUTE_FAMILIES)}); got {family!r}")
    if requested == "fp32":
        return Resolved("fp32")
    if device_type != "cpu":
        if requested == "auto":
            return Resolved(DEFAULT_COMPUTE)
        _once(f"{device_type}:{requested}", "qbackend: compute=%r on %s runs the reference numerics (no fast kernel)",
              requested, device_type)  # fmt: skip
        return Resolved(requested, f"{requested} on {device_type}: reference numerics, slow")
    feats = cpu_features()
    if requested != "auto":
        if not _has(requested, feats):
            raise ComputeUnavailable(
                f"compute={requested!r} needs {REQUIRED_FEATURES[requested][1]}, which this CPU lacks; "
                f"this CPU supports compute = {', '.join(('auto', *cpu_modes(feats)))}"
            )
        if not _fast(requested, family, ints):
            _once_warn(f"slow:{requested}:{family}", "qbackend: compute=%r has no fast kernel for %s layers like %s "
                       "yet; they run the reference numerics (slow)", requested, family, _shape(ints))  # fmt: skip
            return Resolved(requested, "no fast kernel: reference numerics")
        return Resolved(requested)
    missing = []
    for mode in AUTO_MODES[family]:
        if not _has(mode, feats):
            missing.append(f"{mode}: CPU lacks {REQUIRED_FEATURES[mode][1]}")
        elif not _fast(mode, family, ints):
            missing.append(f"{mode}: no fast kernel")
        elif not _faster_than_fp32(mode, family):
            missing.append(f"{mode}: no faster than fp32 on this CPU")
        else:
            return Resolved(mode)
    why = "; ".join(missing)
    _once(f"auto:{family}:{why}", "qbackend: compute='auto' runs %s layers in fp32 (%s)", family, why)
    return Resolved("fp32", f"auto -> fp32 ({why})" if why else "")


def resolve_weight(requested: str, op_name: str, statics: tuple[int, ...], device_type: str) -> Resolved:
    """:func:`resolve` for a layer given as its op name (``nf4_linear``) and op ints (``KernelWeight.statics``)."""
    from .families import by_op_name

    family, _grad = by_op_name(op_name)
    return resolve(requested, family.name, dict(zip(family.ints, statics, strict=True)), device_type)


def _faster_than_fp32(mode: str, family: str) -> bool:
    """Whether ``mode``'s kernel here beats the exact fp32 kernel for ``family`` layers at all (else "auto"
    keeps fp32): int8 weights in "int16" need the AVX-512 widths (``int16_compute.faster_than_fp32``)."""
    if (family, mode) != ("int8", "int16"):
        return True
    from .cpu import int16_compute

    return int16_compute.faster_than_fp32()


def _fast(mode: str, family: str, ints: Mapping[str, int]) -> bool:
    from .cpu import compute  # the CPU kernels load their library on import: only when asked

    return bool(compute.has_fast_kernel(mode, family, ints))


def _shape(ints: Mapping[str, int]) -> str:
    return f"{ints.get('out_features')}x{ints.get('in_features')}"


_logged: set[str] = set()


def _once_warn(key: str, msg: str, *args: object) -> None:
    if key not in _logged:
        _logged.add(key)
        log.warning(msg, *args)


def _once(key: str, msg: str, *args: object) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)
