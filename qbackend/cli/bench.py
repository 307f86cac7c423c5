"""``qbackend bench``: run the benchmark scripts for this machine and append their output to RESULTS.md.

The scripts (``bench_*.py``) live in the repository's ``benchmarks/`` folder, not in the installed
package: the command runs those of ``--benchmarks DIR`` (default: ``./benchmarks``), each in its own
process, skipping the GPU ones without a GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from .common import CLIError, console, print_json, progress
from .machine import machine_info, markdown_header

DEFAULT_DIR = Path("benchmarks")  # relative to the working directory: run from a checkout


def add_parser(sub: Any, name: str) -> None:
    b = sub.add_parser(name, help="run the benchmarks for this machine and append them to RESULTS.md",
                       description="Runs the bench_*.py scripts of a qbackend checkout's benchmarks/ folder (they "
                       "are not part of the installed package) and appends their output to RESULTS.md.")  # fmt: skip
    b.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that have it")
    b.add_argument("--benchmarks", "--dir", dest="dir", metavar="DIR", type=Path, default=None,
                   help="the benchmarks folder of a qbackend checkout (default: ./benchmarks)")  # fmt: skip
    b.add_argument("--results", type=Path, default=None, help="markdown file to append to (default: DIR/RESULTS.md)")
    b.add_argument("--only", default=None, help="comma-separated script names to run (default: all for this machine)")
    b.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark script (default 1800)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")


def find_benchmarks(given: Path | None, cwd: Path | None = None) -> Path:
    """The benchmarks folder: ``given``, else ``<cwd>/benchmarks``; a `CLIError` saying how to point at one."""
    if given is not None:
        if not given.is_dir():
            raise CLIError(f"no such benchmarks folder: {given}")
        return given
    candidate = (cwd or Path.cwd()) / DEFAULT_DIR
    if candidate.is_dir():
        return candidate
    raise CLIError(f"no benchmarks folder in {cwd or Path.cwd()}: the scripts are not installed with the package; "
                   "run from a qbackend checkout or pass --benchmarks DIR")  # fmt: skip


def select_scripts(folder: Path, only: str | None) -> list[Path]:
    """The ``bench_*.py`` scripts of ``folder``, restricted to the comma-separated names of ``only``."""
    scripts = sorted(folder.glob("bench_*.py"))
    if only:
        wanted = {n.strip().removesuffix(".py") for n in only.split(",")}
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            have = ", ".join(s.stem for s in scripts)
            raise CLIError(f"no benchmark {sorted(unknown)[0]!r} in {folder}; have: {have}")
        scripts = [s for s in scripts if s.stem in wanted]
    if not scripts:
        raise CLIError(f"{folder} holds no bench_*.py scripts")
    return scripts


def run(args: argparse.Namespace) -> int:
    folder = find_benchmarks(args.dir)
    scripts = select_scripts(folder, args.only)
    machine = machine_info()
    results = args.results or folder / "RESULTS.md"
    append_header(results, machine, args.quick)
    runs = []
    with progress(len(scripts), quiet=args.json) as step:
        for script in scripts:
            with step(f"running {script.name}"):
                runs.append(run_script(script, args.quick, args.timeout, torch.cuda.is_available()))
                append_run(results, runs[-1])
    if args.json:
        print_json({"machine": machine, "results_file": str(results), "runs": runs})
    else:
        print_bench(machine, runs, results)
    return 0 if all(r["status"] != "failed" for r in runs) else 1


def run_script(script: Path, quick: bool, timeout: float, has_cuda: bool) -> dict[str, Any]:
    """Run one script in its own process; its status ("ok", "skipped", "failed"), seconds and output."""
    run: dict[str, Any] = {"script": script.name, "args": [], "status": "ok", "seconds": 0.0, "output": ""}
    if "gpu" in script.stem and not has_cuda:
        run["status"], run["output"] = "skipped", "needs a CUDA GPU; this machine has none"
        return run
    if quick and "--quick" in script.read_text():  # a script's options are in its argparse text
        run["args"] = ["--quick"]
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), *run["args"]], capture_output=True, text=True,
                              timeout=timeout, cwd=script.parent.parent)  # fmt: skip
        run["output"] = proc.stdout.strip()
        if proc.returncode != 0:
            run["status"] = "failed"
            run["output"] += f"\n[exit status {proc.returncode}]\n" + "\n".join(proc.stderr.strip().splitlines()[-20:])
    except subprocess.TimeoutExpired:
        run["status"], run["output"] = "failed", f"timed out after {timeout:.0f} s"
    run["seconds"] = round(time.perf_counter() - t, 1)
    return run


def append_header(path: Path, machine: dict[str, Any], quick: bool) -> None:
    """Start a section of ``path`` for this run (the file is created with a title if new)."""
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by `qbackend bench` (newest last).\n")
        f.write(markdown_header(f"qbackend bench, {machine['date']}{' (--quick)' if quick else ''}", machine))


def append_run(path: Path, r: dict[str, Any]) -> None:
    """One section per finished script, written at once: an interrupted run keeps what it measured."""
    lines = [f"### {r['script']} {' '.join(r['args'])}".rstrip() + f": {r['status']} ({r['seconds']} s)", ""]
    if r["output"]:
        lines += ["```text", r["output"], "```", ""]
    with open(path, "a") as f:
        f.write("\n" + "\n".join(lines))


def print_bench(machine: dict[str, Any], runs: list[dict[str, Any]], results: Path) -> None:
    out = console()
    for r in runs:
        if r["output"] and r["status"] != "skipped":
            out.rule(f"{r['script']} {' '.join(r['args'])}")
            out.print(r["output"], markup=False, highlight=False)
    t = Table(title=f"qbackend bench: {machine['cpu']}, GPU: {machine['gpu'] or 'none'}", title_justify="left")
    t.add_column("benchmark")
    t.add_column("status")
    t.add_column("seconds", justify="right")
    for r in runs:
        style = {"ok": "green", "skipped": "yellow", "failed": "red"}[r["status"]]
        note = f" ({r['output']})" if r["status"] == "skipped" else ""
        t.add_row(r["script"], f"[{style}]{r['status']}[/{style}]{note}", f"{r['seconds']:.1f}")
    out.print(t)
    out.print(f"appended to {results}")
