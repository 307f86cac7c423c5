"""Distributed checkpoints of quantized models with ``torch.distributed.checkpoint`` (DCP).

>>> save_checkpoint(model, "ckpt")        # every rank calls it; each writes its own shards
>>> load_checkpoint(model, "ckpt")        # into a model sharded over any world size (or none)
>>> consolidate("ckpt", model, "m.safetensors")   # one process: a file for qbackend.load

The quantized layers are saved in the row layout (:mod:`.layout`): codes and constants as tensors
whose dim 0 is whole rows / whole blocks, with their global shapes, so DCP reshards them to a
different world size on load (2 -> 1, 1 -> 2, ...) without ever splitting a block. Next to DCP's
files the checkpoint holds ``qbackend_layout.json``: per quantized layer its scheme, sizes and
tensor shapes. Loading checks it against the target model first and names the first layer that
differs (another format, block size or shape), rather than letting a wrong tensor load.

A save writes into a fresh sibling directory and replaces ``path`` only once every rank has written
all of its files; a save that fails (or a process that dies) leaves the previous checkpoint as it was,
and the ranks still alive raise `CheckpointSaveError`. A partial directory left by a killed rank 0
is removed by the next save to the same path.

Tensor-parallel checkpoints hold NF4/FP4 block constants decoded from their nested form (see
:mod:`.tensor_parallel`); loading one into a model whose layers are still nested decodes those
layers the same way first, so it loads in one process, under FSDP2 or under another TP world size.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..serialization import save as qsave
from .layout import ShardableQuantizedLinear, from_row_layout, quantized_layers, to_row_layout
from .tensor_parallel import denest, denested_scheme

MANIFEST = "qbackend_layout.json"
LAYOUT_VERSION = 1


class CheckpointLayoutError(ValueError):
    """A distributed checkpoint does not fit the model (or is incomplete); the message names the layer."""


class CheckpointSaveError(RuntimeError):
    """A save did not complete on every rank (e.g. another rank died); the previous checkpoint is unchanged."""


# ---- what the checkpoint promises ------------------------------------------------------------------


def _layer_entry(layer: ShardableQuantizedLinear) -> dict[str, Any]:
    return {
        "scheme": layer.scheme.as_dict(),
        "out_features": layer.out_features,
        "in_features": layer.in_features,
        "statics": list(layer.statics),
        "tensors": {n: [list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in layer.quantized_tensors()},
    }


def layout_manifest(model: nn.Module) -> dict[str, Any]:
    """The layout record of ``model``'s quantized layers (what ``qbackend_layout.json`` holds)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    layers = {name: _layer_entry(layer) for name, layer in quantized_layers(model)}
    return {"version": LAYOUT_VERSION, "layout": "rows", "saved_world_size": world, "layers": layers}


def _match_denested(saved: dict[str, Any], model: nn.Module, path: Path) -> None:
    """Decode the nested constants of the model's layers that the checkpoint holds decoded (a TP save)."""
    have = saved.get("layers", {})
    for name, layer in quantized_layers(model):
        got = have.get(name, {}).get("scheme")
        if not (layer.scheme.nested and got is not None and got == denested_scheme(layer.scheme).as_dict()):
            continue
        if isinstance(layer.nested_codes, DTensor):
            raise CheckpointLayoutError(
                f"{path}: layer {name!r}: the checkpoint holds its block constants decoded (a tensor-parallel save), "
                "the model's already sharded layer holds them nested; load into the model before shard_qlora / "
                "parallelize_module, or in one process"
            )
        denest(layer)


def _check_fits(saved: dict[str, Any], model: nn.Module, path: Path) -> None:
    if saved.get("version") != LAYOUT_VERSION or saved.get("layout") != "rows":
        raise CheckpointLayoutError(
            f"{path}: layout version {saved.get('version')!r} / {saved.get('layout')!r} is not supported "
            f"(this qbackend reads version {LAYOUT_VERSION}, 'rows')"
        )
    want = layout_manifest(model)["layers"]
    have = saved.get("layers", {})
    for name, entry in want.items():
        if name not in have:
            raise CheckpointLayoutError(
                f"{path}: layer {name!r} is quantized in the model but not in the checkpoint "
                "(rule: a checkpoint loads into a model quantized the same way)"
            )
        got = have[name]
        for key, what in (("scheme", "format"), ("out_features", "rows"), ("in_features", "columns"),
                          ("tensors", "tensor layout")):  # fmt: skip
            if got.get(key) != entry[key]:
                hint = "a checkpoint loads into a model quantized the same way"
                if key == "scheme" and entry[key].get("nested") is False and got.get("scheme", {}).get("nested"):
                    hint = "this layer was already split by tensor parallel; load before parallelize_module"
                raise CheckpointLayoutError(
                    f"{path}: layer {name!r}: the checkpoint's {what} {_short(got.get(key))} differs from the "
                    f"model's {_short(entry[key])} (rule: {hint})"
                )
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointLayoutError(
            f"{path}: layer {extra[0]!r} is quantized in the checkpoint but not in the model "
            f"({len(extra)} such layer(s)); quantize the model the same way before loading"
        )


def _short(v: Any) -> str:
    if isinstance(v, dict) and "kind" in v:  # a scheme: its name is enough
        return f"{v.get('kind')}{v.get('bits')} block {v.get('blocksize')}{' nested' if v.get('nested') else ''}"
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


@contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process when no process group exists: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ---- save ----------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _shared_nonce() -> str:
    box = [uuid.uuid4().hex[:12] if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return str(box[0])


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None
) -> Path:
    """Save ``model`` (sharded with FSDP2 / tensor parallel, DDP, or a single process) to the directory
    ``path`` with DCP; with ``optimizer``, its state too (to resume training). Every rank calls it.
    Quantized layers still in the flat `QuantizedLinear` form are converted to the row layout first
    (in place). ``path`` is replaced only after a complete save.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointLayoutError(f"{path}: exists and is not a directory; a distributed checkpoint is a directory")
    if not path.parent.is_dir():
        raise CheckpointLayoutError(f"{path.parent}: directory does not exist")
    to_row_layout(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    nonce = _shared_nonce()
    partial = path.parent / f".{path.name}.partial-{nonce}"
    if _rank() == 0:  # left by an earlier save whose rank 0 was killed
        for stale in path.parent.glob(f".{path.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=partial, no_dist=not dist.is_initialized())
        if _rank() == 0:
            _write_json(partial / MANIFEST, layout_manifest(model))
        _barrier()
        if _rank() == 0:
            _commit(partial, path, nonce)
        _barrier()
    except BaseException as e:
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: as they are
            raise
        kept = "the previous checkpoint is unchanged" if path.exists() else "nothing was written there"
        raise CheckpointSaveError(
            f"{path}: the save did not complete on rank {_rank()} ({type(e).__name__}: {_first_line(e)}); {kept}"
        ) from e
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 160 else line[:157] + "..."


def _write_json(file: Path, obj: Any) -> None:
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _commit(partial: Path, path: Path, nonce: str) -> None:
    """Put the complete save at ``path``: the old one moves aside, the new one in, the old one goes."""
    old = path.parent / f".{path.name}.old-{nonce}"
    if path.exists():
        os.rename(path, old)
    os.rename(partial, path)  # between the two renames the previous checkpoint is intact at ``old``
    shutil.rmtree(old, ignore_errors=True)


# ---- load ----------------------------------------------------------------------------------------


def _resolve(path: Path) -> Path:
    """``path``, or the previous checkpoint a save set aside just before it was interrupted."""
    if (path / MANIFEST).is_file():
        return path
    if not path.exists():
        aside = sorted(path.parent.glob(f".{path.name}.old-*"))
        aside = [p for p in aside if (p / MANIFEST).is_file()]
        if aside:
            return aside[-1]
        raise CheckpointLayoutError(f"{path}: no such checkpoint directory")
    raise CheckpointLayoutError(
        f"{path}: not a complete qbackend distributed checkpoint (no {MANIFEST}); "
        "an interrupted save never writes here, so this directory came from elsewhere"
    )


def read_layout(path: str | os.PathLike) -> dict[str, Any]:
    """The layout record stored with a checkpoint (``qbackend_layout.json``)."""
    where = _resolve(Path(path))
    try:
        return json.loads((where / MANIFEST).read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointLayoutError(f"{where / MANIFEST}: unreadable ({e})") from None


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None
) -> nn.Module:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model``, sharded over any world size
    (FSDP2, tensor parallel), replicated, or in one process; with ``optimizer``, its saved state
    too. Every rank calls it.

    ``model`` must be quantized as the saved one (same formats and shapes; its flat quantized layers
    are converted to the row layout in place); otherwise `CheckpointLayoutError` names the layer.
    """
    where = _resolve(Path(path))
    to_row_layout(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    saved = read_layout(where)
    _match_denested(saved, model, where)
    _check_fits(saved, model, where)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    metadata = dcp.FileSystemReader(where).read_metadata()
    _check_files(metadata, where, saved.get("saved_world_size"))
    stored = metadata.state_dict_metadata
    missing = sorted(k for k in state["model"] if f"model.{k}" not in stored)
    if missing:
        raise CheckpointLayoutError(
            f"{where}: tensor {missing[0]!r} of the model is not in the checkpoint ({len(missing)} missing); "
            "was it saved from the same architecture?"
        )
    if optimizer is not None:
        if not any(k.startswith("optimizer.") for k in stored):
            raise CheckpointLayoutError(f"{where}: holds no optimizer state (saved without optimizer=)")
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=where, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return model


def _check_files(metadata: Any, where: Path, saved_world: Any) -> None:
    """Every data file DCP's metadata points to must be there (each rank writes its own)."""
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    missing = [f for f in files if not (where / f).is_file()]
    if missing:
        raise CheckpointLayoutError(
            f"{where}: data file {missing[0]!r} is missing ({len(missing)} of {len(files)} files; the checkpoint "
            f"was saved by {saved_world} rank(s), each writing its own): the checkpoint is incomplete"
        )


def consolidate(path: str | os.PathLike, model: nn.Module, out: str | os.PathLike) -> Path:
    """One process: load the distributed checkpoint ``path`` into ``model`` (unsharded, quantized as
    the saved one, e.g. built with the same ``add_lora`` + ``quantize_base``) and write it as one
    ``qbackend.save`` file ``out``, which ``qbackend.load`` reads. ``model`` ends in the flat form."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("consolidate runs in one process; call it outside the distributed job (or on a group of 1)")
    load_checkpoint(model, path)
    with torch.no_grad():
        from_row_layout(model)
    return qsave(model, out)
