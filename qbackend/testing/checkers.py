"""Invariant checkers for graph rewrites that lower linears (each raises `RewriteCheckError` when violated).

>>> float_graph = capture_graph(model, x)
>>> check_rewrite(float_graph, lambda gm: run_passes(gm, config, measure_error=True))

* :func:`assert_lints`: the graph is well formed and its code compiles.
* :func:`assert_close_to_float`: outputs within a stated relative bound of the float graph's.
* :func:`assert_matches_dequantized`: outputs equal (to float rounding) the float graph's run with each
  quantized weight replaced by its dequantized value: the lowering computes exactly what it claims.
* :func:`assert_lowers_reported`: the quantized ops in the graph are exactly the layers reported as
  quantized (and every layer reported float is still computed in float).
* :func:`assert_idempotent`: running the pass again changes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..passes import LAYER_META, LoweringResult, find_linears
from ..passes.report import Report
from ..passes.weight_cache import dequantize_kernel_weight
from .capture import CapturedGraph

PassFn = Callable[[fx.GraphModule], LoweringResult]


class RewriteCheckError(AssertionError):
    """A rewritten graph broke one of the invariants."""


def quantized_op_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Calls of ``torch.ops.qbackend.*`` ops in ``gm``."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "qbackend"
    ]


def assert_lints(gm: fx.GraphModule) -> None:
    """``graph.lint()`` passes, every ``get_attr`` resolves and the generated code compiles."""
    try:
        gm.graph.lint()
        for n in gm.graph.find_nodes(op="get_attr"):
            obj = gm
            for atom in str(n.target).split("."):
                obj = getattr(obj, atom)
        gm.recompile()
    except Exception as e:  # noqa: BLE001  (any failure here is a broken graph)
        raise RewriteCheckError(f"rewritten graph does not lint: {type(e).__name__}: {e}") from e


def relative_error(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """Max over outputs of ||out - ref|| / ||ref|| (Frobenius, fp64)."""
    if len(reference) != len(outputs):
        raise RewriteCheckError(f"{len(outputs)} outputs, expected {len(reference)}")
    worst = 0.0
    for r, o in zip(reference, outputs, strict=True):
        if not isinstance(r, torch.Tensor):
            continue
        if o.shape != r.shape or o.dtype != r.dtype:
            raise RewriteCheckError(f"output {tuple(o.shape)} {o.dtype}, expected {tuple(r.shape)} {r.dtype}")
        r64, o64 = r.detach().double(), o.detach().double()
        denom = float(r64.norm())
        err = float((o64 - r64).norm())
        worst = max(worst, err / denom if denom > 0 else err)
    return worst


def error_bound(report: Report, factor: float = 3.0, floor: float = 1e-5) -> float:
    """A stated bound for :func:`assert_close_to_float`: ``factor * sum of the quantized layers' weight errors``.

    First order, an output's relative error is the sum over the layers on its path of their relative
    weight errors times condition factors; for well-conditioned models (no outlier channels) those
    are about 1 and ``factor`` covers the rest. Outlier activation channels can amplify a layer's error
    well beyond its average weight error (what SmoothQuant addresses): state a bound for those.
    Needs the report's ``rel_error`` (``measure_error=True``).
    """
    errs = [r.rel_error for r in report.quantized]
    if any(e is None for e in errs):
        raise ValueError("the report has no weight errors; run the pass with measure_error=True")
    return factor * sum(errs) + floor  # type: ignore[arg-type]


def assert_close_to_float(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], bound: float) -> float:
    """Relative output error vs. the float graph is at most ``bound``; returns the error."""
    err = relative_error(reference, outputs)
    if not err <= bound:
        raise RewriteCheckError(f"outputs differ from the float graph by {err:.4g} (relative), bound {bound:.4g}")
    return err


def assert_matches_dequantized(
    float_graph: CapturedGraph, rewritten: CapturedGraph, result: LoweringResult, rtol: float = 1e-4
) -> float:
    """The rewritten graph equals the float graph run with dequantized weights, to ``rtol`` (relative).

    Applies when each quantized parameter is a graph input used only by its quantized sites, in one
    orientation (else ValueError: the substitution would be ambiguous).
    """
    inputs = list(float_graph.example_inputs)
    seen: set[int] = set()
    placeholders = list(rewritten.gm.graph.find_nodes(op="placeholder"))
    for lw in result.lowered:
        idx = lw.param.input_index
        if idx is None or idx in seen or placeholders[idx].users:
            raise ValueError(f"{lw.entry.name}: weight not substitutable (attribute, two orientations or float uses)")
        seen.add(idx)
        w = dequantize_kernel_weight(lw.entry.kw)
        w = w.t() if lw.entry.transposed else w
        inputs[idx] = w.to(lw.param.tensor.dtype).contiguous()
    expected = float_graph.run(inputs=inputs)
    err = relative_error(expected, rewritten.run())
    if not err <= rtol:
        raise RewriteCheckError(f"rewritten graph differs from float-with-dequantized-weights by {err:.3g} > {rtol}")
    return err


def assert_lowers_reported(gm: fx.GraphModule, report: Report) -> None:
    """Quantized op nodes <-> layers reported quantized, one op per lowerable site; float layers stay float."""
    ops = Counter(n.meta.get(LAYER_META) for n in quantized_op_nodes(gm))
    if None in ops:
        raise RewriteCheckError(f"{ops[None]} quantized op(s) with no layer annotation")
    reported = {r.key: r for r in report.quantized}
    if set(ops) != set(reported):
        raise RewriteCheckError(
            f"lowered layers {sorted(ops)} != reported quantized layers {sorted(reported)}"
        )  # fmt: skip
    remaining = Counter((s.param.fqn, s.transposed) for s in find_linears(gm))
    for r in report.layers:
        if r.quantized and not r.reason and (remaining[r.key] or ops[r.key] != r.sites):
            raise RewriteCheckError(
                f"layer {r.name}: {ops[r.key]} quantized ops and {remaining[r.key]} float sites for {r.sites} uses"
            )
        if not r.quantized and remaining[r.key] != r.sites:
            raise RewriteCheckError(f"layer {r.name} reported float ({r.reason}) but not all its uses stay float")


def assert_idempotent(gm: fx.GraphModule, pass_fn: PassFn) -> None:
    """Running ``pass_fn`` on its own output changes neither the code nor the registered tensors."""
    code, buffers = gm.code, dict(gm.named_buffers())
    again = pass_fn(gm)
    if gm.code != code or again.nodes:
        raise RewriteCheckError(f"pass is not idempotent: second run inserted {again.nodes} op(s)")
    if dict(gm.named_buffers()).keys() != buffers.keys():
        raise RewriteCheckError("pass is not idempotent: second run registered new buffers")


@dataclass
class CheckReport:
    result: LoweringResult
    error_vs_float: float
    bound: float
    error_vs_dequantized: float | None


def check_rewrite(
    float_graph: CapturedGraph,
    pass_fn: PassFn,
    bound: float | None = None,
    dequant_rtol: float = 1e-4,
) -> CheckReport:
    """Run ``pass_fn`` on a clone of ``float_graph`` and apply every checker.

    ``bound``: the relative output error allowed vs. float (default: :func:`error_bound` of the report).
    The dequantized-weights equality is checked when it applies.
    """
    reference = float_graph.run()
    rewritten = float_graph.clone()
    result = pass_fn(rewritten.gm)
    assert_lints(rewritten.gm)
    assert_lowers_reported(rewritten.gm, result.report)
    bound = error_bound(result.report) if bound is None else bound
    err = assert_close_to_float(reference, rewritten.run(), bound)
    try:
        err_dq: float | None = assert_matches_dequantized(float_graph, rewritten, result, dequant_rtol)
    except ValueError:
        err_dq = None
    assert_idempotent(rewritten.gm, pass_fn)
    return CheckReport(result, err, bound, err_dq)
