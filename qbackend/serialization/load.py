"""``qbackend.load``: rebuild a quantized model from a qbackend checkpoint or a bitsandbytes 4-bit one.

Nothing is re-quantized and no float weight of a quantized layer is made: the skeleton is built
on the meta device (or given by the caller), its quantized layers are swapped for modules built from
their format records (:mod:`.records`; format-1 files through :mod:`.legacy`), straight from the
stored codes and constants, and every other tensor is assigned from the file.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import ConfigError, QuantConfig
from ..formats import FormatError, LayerRecord
from ..kernels.compute_policy import ComputeUnavailable
from .assign import check_materialised, set_tensor, swap_module
from .bnb import is_bnb_checkpoint, load_bnb
from .layers import build_layer
from .legacy import read_layers_v1
from .manifest import METADATA_KEY, CheckpointError, digest, parse_manifest
from .records import read_layers

log = logging.getLogger("qbackend")

ModelSource = nn.Module | Callable[[], nn.Module] | None


def load(
    path: str | os.PathLike, model: ModelSource = None, *, device: str | torch.device = "cpu",
    compute: str | None = None,
) -> nn.Module:  # fmt: skip
    """Load a checkpoint written by :func:`qbackend.save`, or a bitsandbytes/QLoRA 4-bit checkpoint.

    path: a ``.safetensors`` file, or a directory holding one (or HF-style shards and config.json).
    model: where the weights go.
        * None: rebuilt from the checkpoint (transformers models: from their stored config; a
          bitsandbytes checkpoint directory: from its config.json);
        * a callable (a class or factory taking no arguments): called under ``torch.device("meta")``,
          so no float weight is ever allocated;
        * a module: used as is and modified in place (its quantized layers are swapped; their float
          weights are dropped).
    device: where the loaded tensors go.
    compute: the quantized layers' arithmetic option (``QuantConfig.compute``); None: the one the
        checkpoint's config asked for, else "auto". A run-time choice, resolved on this machine (the
        checkpoint holds the canonical weights whatever the mode).

    Returns the model in eval mode. Raises `CheckpointError` naming the file and the problem
    (not a checkpoint, truncated, corrupt, newer format, does not fit the model).
    """
    files, config_json = _resolve(Path(path))
    tensors, metadata = _read(files, device)
    if metadata is not None and METADATA_KEY in metadata:
        manifest = parse_manifest(metadata, str(files[0]))
        _verify(tensors, manifest, files[0])
        skeleton = _skeleton(model, manifest["model"], config_json, files[0])
        read = read_layers_v1 if manifest["format_version"] == 1 else read_layers
        layers, assigns = read(manifest, tensors, str(files[0]))
        saved = manifest["config"].get("compute") if isinstance(manifest.get("config"), dict) else None
        model = _assemble(skeleton, layers, assigns, str(files[0]))
        return _set_compute(model, compute) if compute is not None else _saved_compute(model, saved, files[0])
    if is_bnb_checkpoint(tensors):
        info = {"transformers_from_config_json": config_json} if config_json else {}
        skeleton = _skeleton(model, info, config_json, files[0])
        return _set_compute(load_bnb(skeleton, tensors, str(files[0])), compute)
    raise CheckpointError(
        f"{files[0]}: not a qbackend checkpoint (no 'qbackend' entry in its metadata) "
        "and not a bitsandbytes 4-bit checkpoint"
    )


def _set_compute(model: nn.Module, compute: str | None) -> nn.Module:
    """Give the loaded quantized layers (those with a ``set_compute``) the ``compute`` option."""
    if compute is not None:
        for m in model.modules():
            if callable(getattr(m, "set_compute", None)):
                m.set_compute(compute)
    return model


def _saved_compute(model: nn.Module, saved: str | None, path: Path) -> nn.Module:
    """The checkpoint's requested compute; one this machine cannot run becomes "auto" (with a warning)."""
    try:
        return _set_compute(model, saved)
    except ComputeUnavailable as e:
        log.warning("qbackend: %s: the checkpoint asks for %s; using compute='auto'", path, e)
        return _set_compute(model, "auto")


# ---- files ---------------------------------------------------------------------------------------


def _resolve(path: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The safetensors file(s) to read and the directory's config.json (if any)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    config = None
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: directory holds no .safetensors file")
        cfg = path / "config.json"
        if cfg.exists():
            try:
                config = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg}: corrupt JSON ({e})") from None
        return files, config
    return [path], None


def _read(files: list[Path], device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    from safetensors import SafetensorError, safe_open  # deferred: only reading a file needs it

    tensors: dict[str, torch.Tensor] = {}
    metadata = None
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as st:
                if metadata is None:
                    metadata = st.metadata()
                for k in st.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    tensors[k] = st.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            size = f.stat().st_size if f.exists() else 0
            raise CheckpointError(
                f"{f}: not a readable safetensors file ({size} bytes; truncated or corrupt?): {e}"
            ) from None
    return tensors, metadata


def _verify(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], path: Path) -> None:
    want = manifest["tensors"]
    missing = [n for n in want if n not in tensors]
    if missing:
        raise CheckpointError(f"{path}: corrupt checkpoint: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    for name, info in want.items():
        if digest(tensors[name]) != info.get("digest"):
            raise CheckpointError(f"{path}: corrupt checkpoint: tensor {name!r} does not match its checksum")


# ---- the model -----------------------------------------------------------------------------------


def _skeleton(model: ModelSource, info: dict[str, Any], config_json: dict | None, path: Path) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if model is not None:
        if not callable(model):
            raise TypeError(f"model must be an nn.Module, a callable returning one, or None; got {type(model)}")
        with torch.device("meta"):
            built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"the model factory returned {type(built).__name__}, not an nn.Module")
        return built
    cls_name = info.get("transformers_class")
    cfg = info.get("transformers_config")
    if cls_name is None and config_json:
        archs = config_json.get("architectures") or []
        cls_name, cfg = (archs[0] if archs else None), config_json
    if cls_name is None or cfg is None:
        saved = info.get("class", "a model")
        raise CheckpointError(
            f"{path}: holds {saved}, which cannot be rebuilt from the file alone; "
            "pass model= (the module, or a function that builds it)"
        )
    return _build_transformers(cls_name, cfg, path)


def _build_transformers(cls_name: str, cfg: dict[str, Any], path: Path) -> nn.Module:
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise CheckpointError(f"{path}: rebuilding {cls_name} needs transformers (pip install transformers)") from None
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise CheckpointError(f"{path}: transformers has no class {cls_name!r}; pass model= to build it yourself")
    config = cls.config_class.from_dict(cfg)
    with torch.device("meta"):
        return cls(config)


def _assemble(
    model: nn.Module, layers: dict[str, LayerRecord], assigns: list[tuple[str, str, torch.Tensor]], path: str
) -> nn.Module:
    kernel_weights: dict = {}  # tied layers share one set of kernel tensors
    for name, rec in layers.items():
        swap_module(model, name, build_layer(name, rec, kernel_weights, path), path, rec.weight.shape)
    for name, kind, t in assigns:
        set_tensor(model, name, t, kind, path)
    check_materialised(model, path)
    return model.eval()


def load_config(path: str | os.PathLike) -> QuantConfig | None:
    """The `QuantConfig` a checkpoint was saved with (None if it was quantized before saving; its
    calibration, if any, is not stored: None). Reads the header only."""
    from safetensors import SafetensorError, safe_open  # deferred: only reading a file needs it

    files, _ = _resolve(Path(path))
    try:
        with safe_open(str(files[0]), framework="pt") as st:
            metadata = st.metadata()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{files[0]}: not a readable safetensors file: {e}") from None
    manifest = parse_manifest(metadata, str(files[0]))
    if manifest["format_version"] == 1:
        raise CheckpointError(
            f"{files[0]}: a format-1 checkpoint keeps only a text of its config, which cannot rebuild it "
            "(its layers load as stored); read that text from the manifest's 'config' entry"
        )
    if manifest["config"] is None:
        return None
    try:
        return QuantConfig.from_dict(manifest["config"])
    except (ConfigError, FormatError) as e:
        raise CheckpointError(f"{files[0]}: corrupt config record: {e}") from None
