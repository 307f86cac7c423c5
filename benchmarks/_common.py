"""What the benchmark scripts share: the machine header, timing in interleaved rounds, results files.

Imported by the ``bench_*.py`` scripts of this folder as ``import _common`` (a script's own folder is
first on ``sys.path``). The machine description is the package's (:mod:`qbackend.cli.machine`), so
the scripts' headers and ``qbackend bench``'s RESULTS.md sections say the same things.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from qbackend.cli.machine import load_average, machine_info, machine_line, versions_line

__all__ = [
    "add_threads_option",
    "apply_threads",
    "build_kernel_library",
    "fmt",
    "header",
    "interleaved",
    "load_line",
    "machine_line",
    "machine_info",
    "medians",
    "time_calls",
    "versions_line",
    "write_json",
    "write_text",
]


# ---- the machine -----------------------------------------------------------------------------------------


def header(info: dict[str, Any] | None = None, extra: str = "") -> str:
    """``# <date>; <machine>; <versions>; load average ...; <extra>``: the first line of a script's output."""
    info = info or machine_info()
    parts = [info["date"], machine_line(info), versions_line(info), load_line("load average at the start")]
    return "# " + "; ".join(p for p in [*parts, extra] if p)


def load_line(label: str = "load average") -> str:
    """``<label>: 1.23, 1.10, 0.98`` (1, 5, 15 minutes), or "" where the OS has none."""
    load = load_average()
    return f"{label}: {', '.join(f'{x:.2f}' for x in load)}" if load else ""


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def apply_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads(args.threads)`` when given."""
    # On a CPU shared with other jobs, a thread descheduled by the OS stalls every OpenMP barrier of
    # a parallel kernel; fewer threads can be the steadier measurement (see benchmarks/results).
    if args.threads:
        torch.set_num_threads(args.threads)


# ---- timing ----------------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn``."""
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def wall_and_cpu_us(fn: Callable[[], object], n: int, warmup: int = 50) -> tuple[float, float]:
    """(wall, thread CPU) microseconds per call of ``fn``: medians of 7 rounds of ``n // 7`` calls."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    per = max(1, n // 7)
    for _ in range(7):
        t, c = time.perf_counter(), time.thread_time()
        for _ in range(per):
            fn()
        walls.append((time.perf_counter() - t) / per * 1e6)
        cpus.append((time.thread_time() - c) / per * 1e6)
    return statistics.median(walls), statistics.median(cpus)


def build_kernel_library(src_dir: Path, out_dir: Path) -> Path:
    """The C++ kernels in ``src_dir`` (another version's ``qbackend/kernels/cpu``) compiled with this tree's
    compiler and flags for this CPU, as ``out_dir / "qlinear_bench.so"``: an old library to A/B against."""
    from qbackend.kernels.cpu import _build

    _, cmd, _ = _build.library_path(_build.cpu_variant())
    out = out_dir / "qlinear_bench.so"
    subprocess.run([*cmd, *map(str, sorted(src_dir.glob("*.cpp"))), "-o", str(out)], check=True, timeout=600)
    return out

def interleaved(
    methods: Mapping[str, Callable[[], object]], rounds: int, calls: int, *, warmup: int = 0,
    alternate: bool = False, calls_for: Callable[[str], int] | None = None,
    give_up: Callable[[str, dict[str, list[float]]], bool] | None = None, settle_s: float = 0.0,
    rewarm: int = 0,
) -> dict[str, list[float]]:  # fmt: skip
    """Seconds of every timed call, per method, measured in rounds that take turns.

    Each round times ``calls`` calls of every method, one method after the other, so a burst of load
    from other processes hits all of them alike. ``warmup`` untimed calls each first. ``alternate``:
    odd rounds go in reverse order (two methods: each goes first half the time). ``calls_for(name)``
    overrides ``calls`` per method. ``give_up(name, samples)``, asked after the first round: stop
    timing a method (one so slow that a round of it is enough). ``settle_s`` / ``rewarm``: before each
    method's timed calls in every round, a pause and that many untimed calls: thread pools that spin
    after their calls (ONNX Runtime's, OpenMP's) then no longer hold the cores the next method needs,
    and a pool woken from sleep is awake again.
    """
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    dropped: set[str] = set()
    for r in range(rounds):
        order = list(methods.items())
        if alternate and r % 2:
            order.reverse()
        for name, fn in order:
            if name not in dropped:
                if settle_s:
                    time.sleep(settle_s)
                for _ in range(rewarm):
                    fn()
                samples[name] += time_calls(fn, calls_for(name) if calls_for else calls)
        if r == 0 and give_up is not None:
            dropped |= {name for name in methods if give_up(name, samples)}
    return samples


def medians(samples: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in samples.items()}


# ---- output ----------------------------------------------------------------------------------------------


def fmt(v: float | None, spec: str, unit: str = "", missing: str = "-") -> str:
    """``format(v, spec) + unit``; ``missing`` for None (a figure that was not measured)."""
    return missing if v is None else format(v, spec) + unit


def write_text(path: str | Path, text: str) -> Path:
    """Write a results file (its folder created), say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_json(path: str | Path, obj: Any, announce: bool = True) -> Path:
    """Write ``obj`` as JSON to ``path``; ``announce``: print ``wrote <path>``."""
    out = write_text(path, json.dumps(obj, indent=1))
    if announce:
        print(f"wrote {out}")
    return out
