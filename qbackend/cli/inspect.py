"""``qbackend inspect``: what a preset would do to each linear weight of a checkpoint, without running it.

Reads a HF model directory or a ``.safetensors`` file (float weights), decides per layer as the
backend does (include/exclude, ``min_params``, supported formats), quantizes each selected weight
and measures its relative error ``||W - dequant(quant(W))|| / ||W||``. A qbackend checkpoint
(``qbackend.save``) is described as stored (formats, bits/param; no float weight to compare with).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from safetensors import SafetensorError, safe_open

from ..core.config import QuantConfig
from ..formats import FormatError, Scheme, quantize
from ..kernels import prepare_weight
from ..kernels.compute_policy import resolve_weight
from ..passes.select_layers import decide_layer
from ..serialization.manifest import CheckpointError, parse_manifest


class InspectError(ValueError):
    """A path that cannot be inspected; one line for the user."""


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, ...]
    quantized: bool
    format: str = ""
    bits_per_param: float = 32.0
    rel_error: float | None = None
    note: str = ""  # why it stays float / what else happens at run time
    compute: str = ""  # the arithmetic the layer would run in on this machine (weight-only formats)


@dataclass
class FloatGroup:
    """Tensors that are not linear weights and stay float, grouped by reason."""

    reason: str
    tensors: int = 0
    params: int = 0
    nbytes: int = 0


@dataclass
class Inspection:
    source: str
    preset: str
    layers: list[LayerRow] = field(default_factory=list)
    floats: list[FloatGroup] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    checkpoint: bool = False  # a qbackend checkpoint: described as stored
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_files(path: Path) -> list[Path]:
    """The .safetensors files of ``path`` (a file or a model directory), or an `InspectError`."""
    if not path.exists():
        raise InspectError(f"no such file or directory: {path}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InspectError(f"{path}: not a .safetensors file (inspect reads safetensors weights)")
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {', '.join(other)}; convert to safetensors)" if other else ""
        raise InspectError(f"{path}: directory holds no model weights (*.safetensors){hint}")
    return files


def inspect_path(path: str | Path, preset: str = "nf4", compute: str = "auto") -> Inspection:
    """Per-layer decisions and weight errors for the weights at ``path`` under ``preset`` (and the
    ``compute`` option resolved per layer for this machine)."""
    path = Path(path)
    config = QuantConfig.preset(preset, **({} if preset == "w8a8" else {"compute": compute}))
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                metadata = metadata or (st.metadata() or {})
                for k in st.keys():  # noqa: SIM118
                    tensors[k] = st.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise InspectError(f"{f}: not a readable safetensors file ({e})") from None
    if "qbackend" in metadata:
        return _describe_checkpoint(str(path), preset, metadata, tensors)
    linear_names = _linear_weight_names(path, tensors)
    out = Inspection(str(path), preset)
    floats: dict[str, FloatGroup] = {}
    for key in sorted(tensors, key=_natural):
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        out.bytes_before += nbytes
        reason = _not_linear_reason(key, t, linear_names)
        if reason:
            g = floats.setdefault(reason, FloatGroup(reason))
            g.tensors, g.params, g.nbytes = g.tensors + 1, g.params + t.numel(), g.nbytes + nbytes
            out.bytes_after += nbytes
            continue
        row = _inspect_linear(key.removesuffix(".weight"), t, config, preset)
        out.layers.append(row)
        out.bytes_after += nbytes if not row.quantized else int(row.bits_per_param * t.numel() / 8)
    out.floats = list(floats.values())
    return out


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _linear_weight_names(path: Path, tensors: dict[str, torch.Tensor]) -> set[str] | None:
    """Names of the linear weights, from the model built on the meta device (HF directory), else None."""
    cfg = path / "config.json" if path.is_dir() else None
    if cfg is None or not cfg.exists():
        return None
    try:
        import transformers  # only to build an HF model's module tree: an optional dependency

        config = json.loads(cfg.read_text())
        cls = getattr(transformers, (config.get("architectures") or [""])[0], None)
        if cls is None:
            return None
        with torch.device("meta"):
            model = cls(cls.config_class.from_dict(config))
    except Exception:  # any failure: fall back to the name heuristics
        return None
    # nn.Linear and transformers' Conv1D (GPT-2), the modules qbackend.quantize_ swaps.
    names = {f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}  # fmt: skip
    return names if names & set(tensors) else None


def _not_linear_reason(key: str, t: torch.Tensor, linear_names: set[str] | None) -> str:
    if not t.is_floating_point():
        return "integer tensors (ids, positions)"
    if t.dim() != 2:
        return "biases and norms (1-D): tiny, kept float"
    if linear_names is not None:
        return "" if key in linear_names else "embedding tables and other 2-D weights: not linear layers"
    low = key.lower()
    if not low.endswith("weight") or any(s in low for s in ("embed", "wte", "wpe", "norm")):
        return "embedding tables and other 2-D weights: not linear layers"
    return ""


def _inspect_linear(name: str, w: torch.Tensor, config: Any, preset: str) -> LayerRow:
    row = LayerRow(name, tuple(w.shape), False, bits_per_param=float(w.element_size() * 8))
    scheme, reason = decide_layer(name, w.numel(), config)
    if scheme is None:
        row.note = reason
        return row
    try:
        qw = quantize(w.float(), scheme, name=name)
    except FormatError as e:
        row.note = f"cannot quantize: {e}"
        return row
    wf = w.float()
    row.quantized, row.format = True, scheme.name
    row.bits_per_param = qw.bits_per_param()
    row.rel_error = float((wf - qw.dequantize(torch.float32)).norm() / wf.norm().clamp(min=1e-30))
    if preset == "w8a8":
        row.note = "activations int8 per token at run time (SmoothQuant scales from calibration)"
    else:
        kw = prepare_weight(qw)
        row.compute = resolve_weight(config.compute, kw.op._opname, kw.statics, "cpu").mode
    return row


def _describe_checkpoint(source: str, preset: str, metadata: dict[str, str], tensors: dict[str, torch.Tensor]):
    try:
        manifest = parse_manifest(metadata, source)
    except CheckpointError as e:
        raise InspectError(str(e)) from None
    out = Inspection(source, preset, checkpoint=True)
    out.bytes_after = sum(t.numel() * t.element_size() for t in tensors.values())
    for name, rec in manifest["layers"].items():
        n, k = rec["out_features"], rec["in_features"]
        shared = (".bias", ".table", ".nested_table")  # bias stays float; code tables are shared
        nbytes = sum(t.numel() * t.element_size() for key, t in tensors.items()
                     if key.startswith(name + ".") and not key.endswith(shared))  # fmt: skip
        fmt = rec.get("format") or _scheme_name(rec["scheme"])  # W8A8 layers name their activation mode too
        out.layers.append(LayerRow(name, (n, k), True, fmt, 8 * nbytes / (n * k),
                                   note="stored quantized (no float weight to compare with)"))  # fmt: skip
        out.bytes_before += 4 * n * k
    quantized = tuple(f"{n}." for n in manifest["layers"])
    g = FloatGroup("other tensors, stored as they are")
    for key, t in tensors.items():
        if not key.startswith(quantized):
            g.tensors, g.params, g.nbytes = g.tensors + 1, g.params + t.numel(), g.nbytes + t.numel() * t.element_size()
    out.bytes_before += g.nbytes
    out.floats = [g] if g.tensors else []
    return out


def _scheme_name(fields: dict[str, Any]) -> str:
    try:
        return Scheme(**fields).name
    except (TypeError, ValueError):
        return "?"


def plot_errors(result: Inspection, path: str | Path, name: str | None = None) -> Path:
    """A horizontal bar chart of the per-layer relative weight error (PNG, matplotlib Agg); ``name`` titles it."""
    import matplotlib  # the plot only: an optional dependency (the 'examples' extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.layers if r.rel_error is not None]
    if not rows:
        raise InspectError("no layer has a measured weight error to plot")
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.22 * len(rows)))
    names = [r.name for r in rows]
    errs = [100 * (r.rel_error or 0.0) for r in rows]
    ax.barh(range(len(rows)), errs, color="#4c72b0")
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()  # first layer on top
    mean = sum(errs) / len(errs)
    ax.axvline(mean, color="#c44e52", linestyle="--", linewidth=1, label=f"mean {mean:.2f}%")
    ax.set_xlabel("relative weight error ||W - Q(W)|| / ||W||  (%)")
    fmts = sorted({r.format for r in rows})
    title = f"{name or Path(result.source).name}: per-layer weight error, preset {result.preset}"
    ax.set_title(f"{title} ({', '.join(fmts)})", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(result: Inspection) -> Table:
    """A rich Table of the inspection."""
    kind = "qbackend checkpoint" if result.checkpoint else f"preset {result.preset}"
    t = Table(title=f"{result.source} ({kind})", title_justify="left", show_footer=True,
              caption=f"weights {result.bytes_before / 1e6:.2f} MB -> {result.bytes_after / 1e6:.2f} MB")  # fmt: skip
    q = [r for r in result.layers if r.quantized]
    t.add_column("layer", footer=f"{len(q)}/{len(result.layers)} linear layers quantized")
    t.add_column("shape")
    t.add_column("format")
    t.add_column("compute")
    t.add_column("bits/param", justify="right")
    errors = [r.rel_error for r in q if r.rel_error is not None]
    t.add_column("rel. weight error", justify="right", footer=f"mean {_mean(errors):.4f}" if errors else "")
    t.add_column("note (why float)")
    for r in result.layers:
        err = "" if r.rel_error is None else f"{r.rel_error:.4f}"
        t.add_row(r.name, "x".join(map(str, r.shape)), r.format or "float", r.compute, f"{r.bits_per_param:.3f}", err,
                  r.note)  # fmt: skip
    for g in result.floats:
        count = f"{g.tensors} tensor{'s' if g.tensors != 1 else ''}"
        t.add_row(f"[dim]{count}[/dim]", f"{g.params / 1e6:.2f}M params", "float", "", "", "", g.reason)
    return t


def _mean(xs: list[float | None]) -> float:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else 0.0
