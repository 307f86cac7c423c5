"""`CalibrationResult`: per-layer activation statistics, saved as safetensors + a JSON sidecar."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__

FORMAT_VERSION = 1


class CalibrationError(ValueError):
    """Calibration could not produce usable statistics; the message says what to fix."""


@dataclass
class LayerStats:
    """What calibration saw at one linear layer's input.

    absmax: fp32 [in_features], max |x_j| over every token seen (running max).
    tokens: rows (tokens) seen.
    samples: fp32 [<= sample_tokens, in_features], a uniform sample of the input rows (for the alpha
        search), or None when calibration kept no samples.
    absmean: fp32 [in_features], mean |x_j| over every token (activation magnitude), or None
        (results saved before it was recorded).
    hessian: fp32 [in_features, in_features], the mean ``X^T X`` over every token (GPTQ), or None
        unless calibrated with ``hessian=True``. Layers reading the same input share one tensor.
    """

    absmax: torch.Tensor
    tokens: int
    samples: torch.Tensor | None = None
    absmean: torch.Tensor | None = None
    hessian: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return int(self.absmax.numel())


@dataclass
class CalibrationResult:
    """Per-layer statistics keyed by layer name (the weight's module path without ``.weight``).

    Pass it to the backend: ``torch.compile(model, backend="qbackend", options={"preset": "w8a8",
    "calibration": result})``. ``never_reached`` lists linear modules of the model no batch reached
    (they are compiled without smoothing, and reported).

    ``example``: the first calibration batch (as given to the model: a tensor, a tuple of arguments
    or a dict of keyword arguments), or None. The W8A8 module form (``qbackend.quantize_`` /
    ``save`` / ``export_mlir`` of a W8A8 model) traces the model once on it to find where the
    scales fold, as the backend does on the compiled graph. Saved with the result when it holds only
    tensors and JSON scalars; not part of the fingerprint.
    """

    layers: dict[str, LayerStats]
    num_batches: int
    never_reached: tuple[str, ...] = ()
    sample_tokens: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    example: Any = field(default=None, repr=False, compare=False)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def get(self, layer: str) -> LayerStats | None:
        return self.layers.get(layer)

    def fingerprint(self) -> str:
        """sha256 over every statistic (for cache keys and logs)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name in sorted(self.layers):
                st = self.layers[name]
                h.update(name.encode())
                h.update(st.absmax.detach().cpu().float().contiguous().numpy().tobytes())
                for t in (st.samples, st.absmean, st.hessian):
                    if t is not None:
                        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def summary(self) -> str:
        return (
            f"CalibrationResult({len(self.layers)} layers, {self.num_batches} batches, "
            f"{max((s.tokens for s in self.layers.values()), default=0)} tokens/layer, "
            f"sample_tokens={self.sample_tokens}, X^T X: {sum(s.hessian is not None for s in self.layers.values())} "
            f"layers, never reached: {list(self.never_reached) or 'none'})"
        )

    # ---- save / load -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<stem>.safetensors`` (tensors) and ``<stem>.json`` (everything else); returns both paths."""
        from safetensors.torch import save_file  # safetensors only when saving

        st_path, js_path = _paths(path)
        tensors: dict[str, torch.Tensor] = {}
        hessian_of: dict[int, str] = {}  # a matrix shared by several layers is stored once
        layer_docs: dict[str, dict[str, Any]] = {}
        for name, st in self.layers.items():
            layer_docs[name] = {"tokens": st.tokens, "in_features": st.in_features}
            tensors[f"{name}::absmax"] = st.absmax.detach().cpu().float().contiguous().clone()
            for key in ("samples", "absmean"):
                t = getattr(st, key)
                if t is not None:
                    tensors[f"{name}::{key}"] = t.detach().cpu().float().contiguous().clone()
            if st.hessian is not None:
                owner = hessian_of.setdefault(id(st.hessian), name)
                if owner == name:
                    tensors[f"{name}::hessian"] = st.hessian.detach().cpu().float().contiguous().clone()
                layer_docs[name]["hessian"] = owner
        doc = {
            "format": "qbackend.smoothquant.calibration",
            "version": FORMAT_VERSION,
            "num_batches": self.num_batches,
            "sample_tokens": self.sample_tokens,
            "never_reached": list(self.never_reached),
            "layers": layer_docs,
            "meta": self.meta,
            "example": _example_to_file(self.example, tensors),
        }
        st_path.parent.mkdir(parents=True, exist_ok=True)
        # Write both to temporary names first so a crash never leaves a half-written pair.
        save_file(tensors, str(st_path) + ".tmp")
        Path(str(js_path) + ".tmp").write_text(json.dumps(doc, indent=1))
        os.replace(str(st_path) + ".tmp", st_path)
        os.replace(str(js_path) + ".tmp", js_path)
        return st_path, js_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationResult:
        """Read a result written by :meth:`save` (give either file or the common stem)."""
        from safetensors.torch import load_file  # safetensors only when loading

        st_path, js_path = _paths(path)
        for p in (st_path, js_path):
            if not p.exists():
                raise CalibrationError(f"calibration file {p} does not exist (save() writes {st_path.name} and "
                                       f"{js_path.name} side by side)")  # fmt: skip
        try:
            doc = json.loads(js_path.read_text())
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{js_path} is not valid JSON ({e}); re-run calibration") from None
        if doc.get("format") != "qbackend.smoothquant.calibration" or doc.get("version") != FORMAT_VERSION:
            raise CalibrationError(
                f"{js_path}: not a qbackend calibration file of version {FORMAT_VERSION} "
                f"(format={doc.get('format')!r}, version={doc.get('version')!r}); re-run calibration"
            )
        tensors = load_file(str(st_path))
        layers: dict[str, LayerStats] = {}
        for name, info in doc["layers"].items():
            absmax = tensors.get(f"{name}::absmax")
            if absmax is None or absmax.numel() != info["in_features"]:
                raise CalibrationError(f"{st_path}: statistics of layer {name!r} are missing or have the wrong size")
            if not bool(torch.isfinite(absmax).all()):
                raise CalibrationError(f"{st_path}: layer {name!r} has NaN/Inf statistics; re-run calibration")
            k = absmax.numel()
            absmean = tensors.get(f"{name}::absmean")
            hessian = tensors.get(f"{info['hessian']}::hessian") if "hessian" in info else None
            if (absmean is not None and absmean.numel() != k) or ("hessian" in info and (
                    hessian is None or tuple(hessian.shape) != (k, k))):  # fmt: skip
                raise CalibrationError(f"{st_path}: statistics of layer {name!r} are missing or have the wrong size")
            layers[name] = LayerStats(absmax, int(info["tokens"]), tensors.get(f"{name}::samples"), absmean, hessian)
        example = _example_from_file(doc.get("example"), tensors, st_path)
        return cls(layers, int(doc["num_batches"]), tuple(doc.get("never_reached", ())), int(doc["sample_tokens"]),
                   dict(doc.get("meta", {})), example)  # fmt: skip


def default_meta() -> dict[str, str]:
    return {
        "qbackend": __version__,
        "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


_EXAMPLE_KEY = "::example::"  # tensor names of the example batch ("::" never starts a layer name)
_SCALARS = (bool, int, float, str, type(None))


def _example_to_file(example: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The JSON record of the example batch, its tensors added to ``tensors``; None if not storable."""
    if example is None:
        return None
    if isinstance(example, torch.Tensor):
        kind, items = "tensor", [("0", example)]
    elif isinstance(example, (tuple, list)):
        kind, items = "args", [(str(i), v) for i, v in enumerate(example)]
    elif isinstance(example, Mapping) and all(isinstance(k, str) for k in example):
        kind, items = "kwargs", list(example.items())
    else:
        return None
    if not all(isinstance(v, (torch.Tensor, *_SCALARS)) for _, v in items):
        return None  # e.g. nested structures: kept in memory only
    values: dict[str, Any] = {}
    for key, v in items:
        if isinstance(v, torch.Tensor):
            tensors[_EXAMPLE_KEY + key] = v.detach().cpu().contiguous().clone()
            values[key] = {"tensor": True}
        else:
            values[key] = {"value": v}
    return {"kind": kind, "items": values}


def _example_from_file(doc: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if doc is None:
        return None
    try:
        items = {}
        for key, rec in doc["items"].items():
            items[key] = tensors[_EXAMPLE_KEY + key] if rec.get("tensor") else rec["value"]
        if doc["kind"] == "tensor":
            return items["0"]
        if doc["kind"] == "args":
            return tuple(items[str(i)] for i in range(len(items)))
        if doc["kind"] == "kwargs":
            return items
    except (KeyError, TypeError, AttributeError):
        pass
    raise CalibrationError(f"{path}: the stored example batch is corrupt; re-run calibration")


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return Path(str(stem) + ".safetensors"), Path(str(stem) + ".json")
