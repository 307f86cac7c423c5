"""``qbackend.save``: a quantized model as one safetensors file with a JSON manifest in its header."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .manifest import METADATA_KEY, CheckpointError, digest, new_manifest
from .source import quantized_module


def save(model: Any, path: str | os.PathLike, *, example_inputs: Any = None, **options: Any) -> Path:
    """Save a quantized model to ``path`` (a ``.safetensors`` file; written to a temp file, then renamed).

    model: a module quantized with :func:`qbackend.quantize_`, or a float / ``torch.compile``d module
        (quantized now with ``options``, else its qbackend compile options, else the defaults; the
        user's model is not modified).
    example_inputs: W8A8 with SmoothQuant only: one batch to trace the model on to fold the scales
        as the backend does (default: the calibration's first batch).

    Stored: every parameter and buffer (quantized layers: their codes and constants, nested ones
    included, never a float weight; whatever else the model carries, e.g. folded scales, as
    tensors), plus a JSON manifest (format version, layer formats, config, model class and
    transformers config, checksums). Load with :func:`qbackend.load`.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give a file name such as {path / 'model.safetensors'}")
    if not path.parent.exists():
        raise CheckpointError(f"{path.parent}: directory does not exist")
    module, config = quantized_module(model, options or None, example_inputs)
    manifest = new_manifest(_model_info(module), config)
    tensors = _collect(module, manifest)
    manifest["layers"] = _layers(module)
    metadata = {METADATA_KEY: json.dumps(manifest, sort_keys=True)}
    _atomic_save(tensors, metadata, path)
    return path


def _model_info(module: nn.Module) -> dict[str, Any]:
    cls = type(module)
    info: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    cfg = getattr(module, "config", None)
    if cls.__module__.startswith("transformers.") and hasattr(cfg, "to_json_string"):
        info["transformers_class"] = cls.__name__
        info["transformers_config"] = json.loads(cfg.to_json_string(use_diff=False))
    return info


def _collect(module: nn.Module, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Unique tensors by name; names sharing one (tied weights, shared code tables) become aliases."""
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    named = [(n, t, "param") for n, t in module.named_parameters(remove_duplicate=False)]
    named += [(n, t, "buffer") for n, t in module.named_buffers(remove_duplicate=False) if t is not None]
    for name, t, kind in named:
        if t.device.type == "meta":
            raise CheckpointError(f"{name}: is on the meta device (no data to save); load or initialise it first")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            manifest["aliases"][name] = seen[key]
            manifest["tensors"][seen[key]]["uses"].append([name, kind])
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing memory: other views of one storage are stored as copies.
        t = t.clone() if ptr in storages and t.numel() else t.contiguous()
        storages.add(ptr)
        tensors[name] = t.cpu()
        manifest["tensors"][name] = {"digest": digest(t), "uses": [[name, kind]]}
    return tensors


def _layers(module: nn.Module) -> dict[str, Any]:
    from dataclasses import asdict

    from ..workflows.w8a8.linear import W8A8Linear
    from ..workflows.weight_only.linear import QuantizedLinear

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, W8A8Linear):
            out[name] = _w8a8_record(m)
        elif isinstance(m, QuantizedLinear):
            out[name] = {
                "op": str(m.op),  # e.g. qbackend.nf4_linear.default
                "statics": list(m.statics),
                "scheme": asdict(m.scheme),
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bias": m.bias is not None,
            }
    return out


def _w8a8_record(m: Any) -> dict[str, Any]:
    """A `W8A8Linear`'s manifest record: the op, activation mode, outlier threshold, how it was smoothed."""
    from dataclasses import asdict

    from ..workflows.w8a8.lower import W8A8_SCHEME

    return {
        "kind": "w8a8",
        "op": str(m.op),  # qbackend.w8a8_linear.default or qbackend.w8a8_outlier_linear.default
        "format": m.format,
        "scheme": asdict(W8A8_SCHEME),
        "activation": m.activation,
        "outlier_threshold": m.threshold,
        "smooth": m.smooth is not None,  # an explicit input multiply (its 1/s is the ``smooth`` tensor)
        "smoothing": m.smoothing,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
    }


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
