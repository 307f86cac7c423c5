"""What the backend did to each linear layer: plain records, a one-line log summary and a rich table."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LayerReport:
    """One linear layer (one weight; tied weights used by several sites are one layer).

    name: module name (``encoder.layer.0.attention.self.query``); param: the parameter's full name.
    forms: how the code computes it ("linear", "matmul", "addmm+bias", ...), one per site.
    quantized: runs on the quantized op; reason: why not (empty when quantized).
    format: the storage format name (``nf4-b64-nested``) when quantized.
    bits_per_param: stored bits per weight element (codes + constants), float bits when not quantized.
    rel_error: ||W - dequant(W_q)|| / ||W|| when measured.
    compute: the arithmetic the quantized op runs in on this machine ("fp32", "bf16", "int8", "int16"; the
        config's ``compute`` option resolved for this layer), None when it has no choice (float, W8A8).
    """

    name: str
    param: str
    shape: tuple[int, int]
    forms: tuple[str, ...]
    quantized: bool
    reason: str = ""
    format: str | None = None
    bits_per_param: float = 32.0
    rel_error: float | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    compute: str | None = None
    transposed: bool = False  # the parameter is stored [in, out] (e.g. GPT-2 Conv1D); W is its transpose

    @property
    def key(self) -> tuple[str, bool]:
        return (self.param, self.transposed)

    @property
    def sites(self) -> int:
        return len(self.forms)


def float_row(
    name: str, param: str, weight: torch.Tensor, *, transposed: bool, forms: tuple[str, ...], reason: str = ""
) -> LayerReport:
    """The record of a linear layer as it is before quantizing (float bits and bytes; ``[out, in]`` shape).

    ``weight``: the parameter, stored ``[in, out]`` when ``transposed`` (GPT-2's Conv1D).
    """
    shape = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight.shape[1])
    nbytes = weight.numel() * weight.element_size()
    return LayerReport(
        name=name, param=param, shape=(int(shape[0]), int(shape[1])), forms=forms, quantized=False, reason=reason,
        bits_per_param=float(weight.element_size() * 8), bytes_before=nbytes, bytes_after=nbytes,
        transposed=transposed,
    )  # fmt: skip


@dataclass
class Report:
    """Per-layer records of one or more compiled graphs, with totals.

    sections: what a workflow reports beyond the layers, by name, one entry per graph (e.g.
    ``"smoothquant"``: the SmoothQuant fold reports, a ``FoldReport`` per graph).
    """

    layers: list[LayerReport] = field(default_factory=list)
    graphs: int = 0
    sections: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.quantized]

    @property
    def kept_float(self) -> list[LayerReport]:
        return [r for r in self.layers if not r.quantized]

    @property
    def bytes_before(self) -> int:
        """Float bytes of the linear layers' weights (a parameter used by several layers counted once)."""
        return sum({r.param: r.bytes_before for r in self.layers}.values())

    @property
    def bytes_after(self) -> int:
        """Quantized bytes of quantized layers plus float bytes of weights still used in float."""
        quantized = sum(r.bytes_after for r in self.layers if r.quantized)
        floats = {r.param: r.bytes_before for r in self.layers if not r.quantized or r.reason}
        return quantized + sum(floats.values())

    def layer(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name or r.param == name:
                return r
        raise KeyError(f"no layer {name!r}; layers: {', '.join(r.name for r in self.layers)}")

    def merge(self, others: Iterable[Report]) -> Report:
        """One report over several graphs (graph breaks); a layer seen twice is listed once."""
        out = Report(list(self.layers), self.graphs, {k: list(v) for k, v in self.sections.items()})
        seen = {r.key for r in out.layers}
        for o in others:
            out.graphs += o.graphs
            for k, v in o.sections.items():
                out.sections.setdefault(k, []).extend(v)
            for r in o.layers:
                if r.key not in seen:
                    seen.add(r.key)
                    out.layers.append(r)
        return out

    def summary(self) -> str:
        """One line for the compile-time log."""
        q, f = self.quantized, self.kept_float
        fmts = sorted({r.format for r in q if r.format})
        line = (
            f"quantized {len(q)}/{len(self.layers)} linear layers"
            + (f" to {', '.join(fmts)}" if fmts else "")
            + f" (weights {_mb(self.bytes_before)} -> {_mb(self.bytes_after)})"
        )
        modes: dict[str, int] = {}
        for r in q:
            if r.compute:
                modes[r.compute] = modes.get(r.compute, 0) + 1
        if modes:
            line += "; compute " + ", ".join(f"{m} x{n}" for m, n in sorted(modes.items()))
        if f:
            reasons: dict[str, int] = {}
            for r in f:
                key = r.reason.split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
            line += "; kept float: " + ", ".join(f"{n} {k}" for k, n in reasons.items())
        return line

    def __rich__(self):
        from rich.table import Table  # rich only when a report is printed

        t = Table(title="qbackend: linear layers", show_footer=True, title_justify="left")
        t.add_column("layer", footer=f"{len(self.quantized)}/{len(self.layers)} quantized")
        t.add_column("form")
        t.add_column("shape")
        t.add_column("quantized")
        t.add_column("format / reason")
        t.add_column("compute")
        t.add_column("bits/param", justify="right")
        t.add_column("rel. weight error", justify="right")
        t.add_column("MB before", justify="right", footer=f"{self.bytes_before / 1e6:.3f}")
        t.add_column("MB after", justify="right", footer=f"{self.bytes_after / 1e6:.3f}")
        for r in self.layers:
            t.add_row(
                r.name,
                ", ".join(sorted(set(r.forms))) + (f" x{r.sites}" if r.sites > 1 else ""),
                f"{r.shape[0]}x{r.shape[1]}",
                "yes" if r.quantized else "no",
                r.format if r.quantized else r.reason,
                r.compute or "",
                f"{r.bits_per_param:.3f}",
                "" if r.rel_error is None else f"{r.rel_error:.4f}",
                f"{r.bytes_before / 1e6:.3f}",
                f"{r.bytes_after / 1e6:.3f}",
            )
        return t

    def __str__(self) -> str:
        from rich.console import Console  # rich only when a report is printed

        buf = io.StringIO()
        Console(file=buf, width=160, color_system=None, force_terminal=False).print(self)
        return buf.getvalue()


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
