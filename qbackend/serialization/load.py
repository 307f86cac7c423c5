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
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.config import ConfigError, QuantConfig
from ..formats import FormatError, LayerRecord
from ..kernels.compute_policy import ComputeUnavailable
from .assign import check_materialised, has_module, has_tensor, set_tensor, swap_module
from .bnb import is_bnb_checkpoint, load_bnb
from .layers import build_layer
from .legacy import read_layers_v1
from .manifest import METADATA_KEY, CheckpointError, check_tensor, parse_manifest
from .records import read_layers

log = logging.getLogger("qbackend")

ModelSource = nn.Module | Callable[[], nn.Module] | None


class LoadResult(NamedTuple):
    """What ``load(..., strict=False)`` returns: the model and what did not match (as ``load_state_dict``)."""

    model: nn.Module
    missing_keys: list[str]
    unexpected_keys: list[str]


def load(
    path: str | os.PathLike, model: ModelSource = None, *, device: str | torch.device = "cpu", strict: bool = True,
    compute: str | None = None,
) -> Any:  # fmt: skip
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
    strict: as ``load_state_dict``: a layer or tensor of the model that the checkpoint lacks
        (missing), or one of the checkpoint that the model lacks (unexpected), is an error listing
        them. ``strict=False``: loads what matches and returns a `LoadResult` ``(model,
        missing_keys, unexpected_keys)`` instead of the model (a model built on the meta device
        still needs every tensor).
    compute: the quantized layers' arithmetic option (``QuantConfig.compute``); None: the one the
        checkpoint's config asked for, else "auto". A run-time choice, resolved on this machine (the
        checkpoint holds the canonical weights whatever the mode).

    Returns the model in eval mode. Raises `CheckpointError` naming the file and the problem
    (not a checkpoint, truncated, corrupt, newer format, does not fit the model).
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False; got {type(strict).__name__}")
    files, config_json = _resolve(Path(path))
    tensors, metadata = _read(files, device)
    if metadata is not None and METADATA_KEY in metadata:
        manifest = parse_manifest(metadata, str(files[0]))
        _verify(tensors, manifest, files[0])
        _check_config(manifest, files[0])
        skeleton = _skeleton(model, manifest["model"], config_json, files[0])
        read = read_layers_v1 if manifest["format_version"] == 1 else read_layers
        layers, assigns = read(manifest, tensors, str(files[0]))
        saved = manifest["config"].get("compute") if isinstance(manifest.get("config"), dict) else None
        result = _assemble(skeleton, layers, assigns, str(files[0]), strict)
        model = _set_compute(result.model, compute) if compute is not None else _saved_compute(result.model, saved,
                                                                                               files[0])
        return model if strict else LoadResult(model, result.missing_keys, result.unexpected_keys)
    if is_bnb_checkpoint(tensors):
        info = {"transformers_from_config_json": config_json} if config_json else {}
        skeleton = _skeleton(model, info, config_json, files[0])
        loaded = _set_compute(load_bnb(skeleton, tensors, str(files[0])), compute)
        return loaded if strict else LoadResult(loaded, [], [])
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
        check_tensor(name, tensors[name], info, str(path))


def _check_config(manifest: dict[str, Any], path: Path) -> None:
    """The stored QuantConfig record must rebuild (it describes how the layers were made)."""
    if manifest["format_version"] == 1 or manifest.get("config") is None:
        return
    try:
        QuantConfig.from_dict(manifest["config"])
    except (ConfigError, FormatError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt config record: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


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
    if not isinstance(cls, type) or not issubclass(cls, nn.Module) or not hasattr(cls, "config_class"):
        raise CheckpointError(f"{path}: transformers has no model class {cls_name!r}; pass model= to build it yourself")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: corrupt qbackend manifest: the transformers config is {type(cfg).__name__}")
    _check_config_types(cls.config_class, cfg, cls_name, path)
    try:
        config = cls.config_class.from_dict(cfg)
        with torch.device("meta"):
            return cls(config)
    except Exception as e:  # noqa: BLE001  (a corrupt config can fail anywhere in a model's constructor)
        raise CheckpointError(
            f"{path}: cannot build {cls_name} from the stored config ({type(e).__name__}: {_first_line(e)}); "
            "the manifest is corrupt, or pass model="
        ) from None


def _kind(v: Any) -> str:
    return "bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) else type(v).__name__


def _check_config_types(config_class: type, cfg: dict[str, Any], cls_name: str, path: Path) -> None:
    """Each stored config field must have the JSON type of the config class's default for it (the
    model code trusts them: a list where an int belongs fails deep inside a forward)."""
    try:
        defaults = config_class().to_dict()
    except Exception:  # noqa: BLE001  (a config class without usable defaults: nothing to compare with)
        return
    for key, value in cfg.items():
        want = defaults.get(key)
        if want is not None and value is not None and _kind(want) != _kind(value):
            raise CheckpointError(
                f"{path}: corrupt qbackend manifest: {cls_name} config field {key!r} is {_kind(value)}, "
                f"where {config_class.__name__} has {_kind(want)}"
            )


def _assemble(
    model: nn.Module, layers: dict[str, LayerRecord], assigns: list[tuple[str, str, torch.Tensor]], path: str,
    strict: bool,
) -> LoadResult:  # fmt: skip
    unexpected = [n for n in layers if not has_module(model, n)]
    unexpected += [n for n, _, _ in assigns if not has_tensor(model, n)]
    if unexpected and strict:
        raise CheckpointError(f"{path}: the model has no {_listing(unexpected)}, which the checkpoint holds; "
                              "is this the right model? (strict=False loads the rest)")  # fmt: skip
    skip = set(unexpected)
    kernel_weights: dict = {}  # tied layers share one set of kernel tensors
    for name, rec in layers.items():
        if name not in skip:
            swap_module(model, name, build_layer(name, rec, kernel_weights, path), path, rec.weight.shape)
    done = {n for n, _, _ in assigns if n not in skip}
    for name, kind, t in assigns:
        if name not in skip:
            set_tensor(model, name, t, kind, path)
    prefixes = tuple(f"{n}." for n in layers if n not in skip)
    missing = [k for k in model.state_dict(keep_vars=True) if k not in done and not k.startswith(prefixes)]
    check_materialised(model, path)
    if missing and strict:
        raise CheckpointError(f"{path}: the checkpoint does not hold {_listing(missing)}, which the model has; "
                              "is this the right model? (strict=False keeps their current values)")  # fmt: skip
    return LoadResult(model.eval(), missing, unexpected)


def _listing(names: list[str], first: int = 3) -> str:
    """``'a', 'b', 'c' and 5 more`` (a count, never a wall of names)."""
    more = f" and {len(names) - first} more" if len(names) > first else ""
    return ", ".join(repr(n) for n in names[:first]) + more + f" ({len(names)} in all)"


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
