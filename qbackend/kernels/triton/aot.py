"""Compile every kernel specialisation ahead of time for a CUDA target, without a GPU.

``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin via the bundled ptxas) on a CPU-only machine. This checks what the interpreter cannot:
that the kernels type-check and lower for the real target (tl.dot shape minimums, layouts,
constexpr branches), and reports registers, spills and shared memory per specialisation, plus
whether the expected instructions appear (tensor-core MMA, 128-bit loads).

    python -m qbackend.kernels.triton.aot [--arch 90] [--quick]

Pointer and size arguments are marked 16-divisible as Triton's launcher would for the benchmark
shapes, so the code is representative of the aligned fast path.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import triton
import triton.language as tl

from . import autotune as at
from ._runtime import compiled_kernels
from .linear import CODEBOOK, INT4, INT8

_PTR = {"x": "*fp16", "out": "*fp16", "f32": "*fp32", "u8": "*u8", "i8": "*i8"}


@dataclass
class Spec:
    """One specialisation: kernel, argument types (None = constexpr None), constexprs, launch options."""

    name: str
    kernel: Any
    types: dict[str, str | None]
    consts: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    expect: list[str] = field(default_factory=list)  # regexes the SASS (or PTX) must contain


@dataclass
class Report:
    name: str
    ok: bool
    seconds: float
    n_regs: int = -1
    n_spills: int = -1
    shared: int = -1
    missing: list[str] = field(default_factory=list)
    error: str = ""


# Largest dynamic shared memory per block (opt-in), bytes.
_SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_DT = {"fp16": (tl.float16, "*fp16"), "bf16": (tl.bfloat16, "*bf16"), "fp32": (tl.float32, "*fp32")}


def _wo_types(layout: int, nested: bool, zp: bool, bias: bool, act: str, out: str, grad: bool) -> dict[str, str | None]:
    t: dict[str, str | None] = {}
    if grad:
        t |= {"g_ptr": act, "out_ptr": out}
    else:
        t |= {"x_ptr": act, "out_ptr": out, "bias_ptr": "*fp32" if bias else None}
    t |= {
        "codes_ptr": "*i8" if layout == INT8 else "*u8",
        "s_ptr": None if nested else "*fp32",
        "zp_ptr": "*u8" if zp else None,
        "ncode_ptr": "*u8" if nested else None,
        "nabs_ptr": "*fp32" if nested else None,
        "noff_ptr": "*fp32" if nested else None,
        "tab_ptr": "*fp32" if layout == CODEBOOK else None,
        "ntab_ptr": "*fp32" if nested else None,
    }
    return t


def specs(quick: bool = False) -> Iterator[Spec]:
    """The specialisations the launchers use for the benchmark shapes (bs 64 NF4, g128 int4)."""
    formats = [
        ("nf4n-b64", CODEBOOK, True, False, 64),
        ("nf4-b64", CODEBOOK, False, False, 64),
        ("int4-g128", INT4, False, False, 128),
        ("int4zp-g128", INT4, False, True, 128),
        ("int8", INT8, False, False, 1),
    ]
    K = compiled_kernels()
    dtypes = ["bf16"] if quick else ["bf16", "fp16", "fp32"]
    for fname, layout, nested, zp, bs in formats:
        for dt in dtypes:
            tl_dt, ptr = _DT[dt]
            prec = "ieee" if dt == "fp32" else "tf32"
            # al: K % bs == 0 (pairs, constants per tile); pg: even K, straddling blocks (pairs,
            # constants per pair); odd: odd K (per-element nibble and constants); int8: per element.
            modes = [("al", True, True), ("pg", True, False), ("odd", False, False)]
            if layout == INT8:
                modes = [("gen", 0, 0)]
            for mode, pairs, aligned in modes[:1] if quick else modes:
                tag = f"{fname}-{dt}-{mode}"
                base = {
                    "LAYOUT": layout, "BS": bs, "NBS": 256, "NESTED": nested, "HAS_ZP": zp, "IDX64": False,
                    "ALIGNED": bool(aligned),
                }  # fmt: skip
                sizes = {"N": "i32", "K": "i32", "KH": "i32", "G": "i32", "stride_xm": "i32", "stride_om": "i32",
                         "K_SPLIT": "i32", "KP_SPLIT": "i32"}  # fmt: skip
                # GEMV, split-K, fp32 atomics
                yield Spec(
                    f"gemv-{tag}", K.wo_gemv_kernel,
                    _wo_types(layout, nested, zp, True, ptr, "*fp32", False) | sizes,
                    base | {"PAIRS": pairs, "HAS_BIAS": True, "ATOMIC": True, "BLOCK_N": 64, "BLOCK_K": 64},
                    num_warps=4, num_stages=2, expect=[r"LDG\.E(\.EF)?\.128|LDG\.E\.64|LDG"],
                )  # fmt: skip
                if mode == "al" or layout == INT8:
                    # Wide decode GEMV (M <= 4): heuristic tiles, table gathered / selected in registers.
                    wsizes = {"M": "i32", "N": "i32", "K": "i32", "KH": "i32", "G": "i32", "stride_xm": "i32",
                              "stride_om": "i32", "K_SPLIT": "i32", "KP_SPLIT": "i32"}  # fmt: skip
                    wbk = 256 if layout == INT8 else 512
                    wbase = {k: v for k, v in base.items() if k != "ALIGNED"}
                    for lut in (0, 1, 2, 3) if layout == CODEBOOK else (0,):
                        lname = ("-glb", "-sel", "-tlg", "")[lut] if layout == CODEBOOK else ""
                        for bm in (1, 4):
                            yield Spec(
                                f"wide{lname}-m{bm}-{tag}", K.wo_gemv_wide_kernel,
                                _wo_types(layout, nested, zp, True, ptr, "*fp32", False)
                                | {"ptab_ptr": "*fp32" if lut == 3 else None} | wsizes,
                                wbase | {"SUB": min(bs, wbk), "HAS_BIAS": True, "ATOMIC": True, "LUT": lut,
                                         "SIGNED": True, "PREFETCH": layout != INT8, "BLOCK_M": bm, "BLOCK_N": 16,
                                         "BLOCK_K": wbk},
                                num_warps=4, num_stages=2, expect=[r"LDG\.E(\.EF)?\.128"],
                            )  # fmt: skip
                if mode == "al" and layout == CODEBOOK:
                    # Wide-K tl.dot (small M): the heuristic tiles (linear.WIDE_DOT_ROWS), table in global
                    # memory or as byte pairs.
                    dwbase = {k: base[k] for k in ("BS", "NBS", "NESTED", "IDX64")}
                    for lut, lname in ((0, ""), (3, "-prs")):
                        for m in (8, 16, 64):
                            bm, (bn, bk, nw) = at.block_m_for(m), at.dot_wide_tile(m, dt == "fp32")
                            yield Spec(
                                f"dotwide{lname}-m{m}-{tag}", K.wo_dot_wide_kernel,
                                _wo_types(layout, nested, zp, True, ptr, "*fp32", False)
                                | {"ptab_ptr": "*fp32" if lut == 3 else None} | wsizes,
                                dwbase | {"SUB": min(bs, bk), "HAS_BIAS": True, "ATOMIC": True, "LUT": lut,
                                          "PREFETCH": True, "DOT_DTYPE": tl_dt, "DOT_PREC": prec, "BLOCK_M": bm,
                                          "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1},
                                num_warps=max(nw, 8 if bm >= 64 else 4), num_stages=1,
                                expect=[r"LDG\.E(\.EF)?\.128" if bk >= 128 else r"LDG"]
                                + ([] if dt == "fp32" else [r"HGMMA|HMMA"]),
                            )  # fmt: skip
                dsizes = {"M": "i32"} | sizes
                for vname, bm, bn, bk, atomic, nw, ns in (
                    ("small", 16, 64, 64, True, 4, 3),
                    ("large", 128, 128, 64, False, 8, 3),
                ):
                    yield Spec(
                        f"dot-{vname}-{tag}", K.wo_dot_kernel,
                        _wo_types(layout, nested, zp, True, ptr, "*fp32" if atomic else ptr, False) | dsizes,
                        base | {"PAIRS": pairs, "HAS_BIAS": True, "ATOMIC": atomic, "DOT_DTYPE": tl_dt,
                                "DOT_PREC": prec, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                        num_warps=nw, num_stages=ns, expect=[] if dt == "fp32" else [r"HGMMA|HMMA"],
                    )  # fmt: skip
                gsizes = {"M": "i32", "N": "i32", "K": "i32", "KH": "i32", "G": "i32", "stride_gm": "i32",
                          "stride_om": "i32", "N_SPLIT": "i32"}  # fmt: skip
                yield Spec(
                    f"grad-{tag}", K.wo_grad_kernel,
                    _wo_types(layout, nested, zp, False, ptr, ptr, True) | gsizes,
                    base | {"PAIRS": pairs, "ATOMIC": False, "DOT_DTYPE": tl_dt, "DOT_PREC": prec,
                            "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8},
                    num_warps=4, num_stages=3, expect=[] if dt == "fp32" else [r"HGMMA|HMMA"],
                )  # fmt: skip
                wtypes = _wo_types(layout, nested, zp, False, ptr, ptr, True)
                del wtypes["g_ptr"]
                yield Spec(
                    f"decode-{tag}", K.wo_decode_kernel,
                    wtypes | {"N": "i32", "K": "i32", "KH": "i32", "G": "i32"},
                    base | {"PAIRS": pairs, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, expect=[r"STG"],
                )  # fmt: skip
    yield Spec("read-runs", K.read_runs_kernel, {"addr_ptr": "*i64", "out_ptr": "*u8"}, {"RUN": 64}, num_warps=1,
               expect=[r"LDG"])  # fmt: skip
    for dt in dtypes:
        _, ptr = _DT[dt]
        yield Spec(
            f"act-quant-{dt}", K.act_quant_kernel,
            {"x_ptr": ptr, "q_ptr": "*i8", "sx_ptr": "*fp32", "act_scale_ptr": None, "K": "i32", "stride_xm": "i32",
             "stride_qm": "i32"},
            {"STATIC": False, "BLOCK_K": 1024}, num_warps=4,
        )  # fmt: skip
        for vname, bm, bn, bk, atomic, nw, ns in (
            ("small", 16, 64, 128, True, 4, 3),
            ("large", 128, 128, 128, False, 8, 3),
        ):
            yield Spec(
                f"w8a8-{vname}-{dt}", K.w8a8_kernel,
                {"xq_ptr": "*i8", "sx_ptr": "*fp32", "w_ptr": "*i8", "sw_ptr": "*fp32", "bias_ptr": "*fp32",
                 "out_ptr": "*fp32" if atomic else ptr, "M": "i32", "N": "i32", "K": "i32", "stride_qm": "i32",
                 "stride_om": "i32", "K_SPLIT": "i32"},
                {"HAS_BIAS": True, "ATOMIC": atomic, "IDX64": False, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                 "GROUP_M": 8},
                num_warps=nw, num_stages=ns, expect=[r"IGMMA|IMMA"],
            )  # fmt: skip


def _attrs(fn: Any, types: dict[str, str | None]) -> dict[tuple[int, ...], list[list[Any]]]:
    """16-divisibility of pointers and sizes, as Triton's launcher specialises for aligned shapes."""
    out: dict[tuple[int, ...], list[list[Any]]] = {}
    for name, ty in types.items():
        if ty is not None and name != "G":
            out[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return out


def compile_spec(spec: Spec, arch: int = 90) -> Report:
    # triton is optional (CUDA): imported when compiling
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.kernel
    sig: dict[str, str] = {}
    consts: dict[str, Any] = dict(spec.consts)
    for name in fn.arg_names:
        if name in spec.types:
            ty = spec.types[name]
            if ty is None:
                sig[name] = "constexpr"
                consts[name] = None
            else:
                sig[name] = ty
        elif name in consts:
            sig[name] = "constexpr"
        else:
            raise KeyError(f"{spec.name}: no type for argument {name!r}")
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=_attrs(fn, spec.types))
        ck = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            # FMA fusion on, as the launchers ask for (Triton 3.10 turns the default off).
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True},
        )
    except Exception as e:  # noqa: BLE001 - report every failure, keep compiling the rest
        msg = str(e).strip().splitlines()
        return Report(spec.name, False, time.time() - t0, error=(msg[-1] if msg else repr(e))[:300])
    rep = Report(spec.name, True, time.time() - t0)
    md = ck.metadata
    rep.shared = int(getattr(md, "shared", -1))
    sass = _sass(ck.asm.get("cubin"), arch)
    text = sass or ck.asm.get("ptx", "")
    rep.n_regs, rep.n_spills = _regs(ck, text)
    rep.missing = [p for p in spec.expect if not re.search(p, text)]
    limit = _SMEM_LIMIT.get(arch)
    if limit is not None and rep.shared > limit:
        # Compiles, but would raise OutOfResources at launch (the launchers then shrink the config).
        rep.error = f"shared memory {rep.shared} > {limit} (sm_{arch})"
    rep.ok = not rep.missing and not rep.error
    return rep


def _sass(cubin: bytes | None, arch: int) -> str:
    """Disassemble with the bundled cuobjdump, if present (for instruction checks)."""
    if not cubin:
        return ""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, timeout=120).stdout
        except (OSError, subprocess.SubprocessError):
            return ""


def _regs(ck: Any, text: str) -> tuple[int, int]:
    """Registers and spill bytes, from the compiled kernel if it knows them, else from ptxas' view of the SASS."""
    n_regs = getattr(ck, "n_regs", None)
    n_spills = getattr(ck, "n_spills", None)
    if n_regs is None:
        # Local-memory traffic in the SASS means spills (or a register array indexed at run time).
        n_spills = len(re.findall(r"\b(LDL|STL)\b", text))
        m = re.findall(r"\bR(\d+)\b", text)
        n_regs = max((int(r) for r in m), default=-2) + 1
    return int(n_regs), int(n_spills)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an int (80, 90)")
    ap.add_argument("--quick", action="store_true", help="bf16 and the aligned path only")
    ap.add_argument("--filter", default="", help="regex on specialisation names")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    fails = 0
    for spec in specs(args.quick):
        if args.filter and not re.search(args.filter, spec.name):
            continue
        r = compile_spec(spec, args.arch)
        fails += not r.ok
        status = "ok " if r.ok else "FAIL"
        extra = f"missing {r.missing}" if r.missing else r.error
        print(
            f"{status} {r.name:34s} {r.seconds:5.1f}s regs {r.n_regs:4d} spill {r.n_spills:3d} "
            f"smem {r.shared:6d} {extra}",
            flush=True,
        )
    print(f"{fails} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
