"""``qbackend inspect``: per-layer formats and weight errors of a model directory or .safetensors file."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

from ..core.config import PRESETS
from ..kernels.compute_policy import COMPUTE_OPTIONS, ComputeUnavailable
from .common import CLIError, console, print_json, progress
from .inspect import InspectError, inspect_path, plot_errors, render


def add_parser(sub: Any, name: str) -> None:
    i = sub.add_parser(name, help="per-layer formats and weight errors of a model directory or .safetensors file")
    i.add_argument("path", metavar="MODEL_DIR_OR_FILE")
    i.add_argument("--preset", default="nf4", help="nf4 (default), fp4, int4, int4-g64, int8, w8a8")
    i.add_argument("--plot", metavar="FILE", nargs="?", const="", default=None,
                   help="also write a PNG of the per-layer error (needs matplotlib; FILE default: "
                        "<name>-<preset>-error.png; with --json, FILE must be given)")  # fmt: skip
    i.add_argument("--no-plot", action="store_true", help="no PNG (the default; kept for scripts)")
    i.add_argument("--compute", default="auto", choices=COMPUTE_OPTIONS,
                   help="arithmetic option of the quantized layers (default auto): shows what each resolves to here")
    i.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    if args.preset not in PRESETS:
        raise CLIError(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
    path = Path(args.path)
    try:
        with progress(None, quiet=args.json) as step, step(f"quantizing the weights of {path.name} ({args.preset})"):
            result = inspect_path(path, args.preset, args.compute)
        if args.plot is not None and not args.no_plot:
            result.plot = _plot(result, path, args)
    except (InspectError, ComputeUnavailable) as e:
        raise CLIError(str(e)) from None
    if args.json:
        print_json(result.to_dict())
        return 0
    out = console()
    out.print(render(result))
    if result.plot:
        out.print(f"per-layer error plot: {result.plot}")
    return 0


def _plot(result: Any, path: Path, args: argparse.Namespace) -> str | None:
    """Write the PNG asked for with --plot (a clear error without matplotlib; nothing if no layer has an error)."""
    if args.json and not args.plot:
        raise CLIError("--plot with --json needs a FILE (no PNG is written to the current directory under --json)")
    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError("--plot needs matplotlib, which is not installed: pip install matplotlib (or drop --plot)")
    if not any(r.rel_error is not None for r in result.layers):
        return None
    stem = path.stem if path.is_file() else model_name(path)
    return str(plot_errors(result, args.plot or f"{stem}-{args.preset}-error.png", name=stem))


def model_name(directory: Path) -> str:
    """The name to give a model directory's plot."""
    # Packaged models often sit in a folder called "model": name the plot after the package instead.
    d = directory.resolve()
    return d.parent.name if d.name in ("model", "models", "weights") and d.parent.name else d.name
