"""The JSON manifest of a qbackend checkpoint: what the tensors are and how to rebuild the model.

It rides in the safetensors header (``__metadata__["qbackend"]``), so a checkpoint is one file that
any safetensors reader opens. Fields (format 2):

* ``format``/``format_version``: "qbackend" and :data:`FORMAT_VERSION` (refused when newer; format 1
  is read by :mod:`.legacy`).
* ``qbackend_version``, ``torch_version``, ``created``: provenance.
* ``model``: the model's class and, for transformers models, its config (to rebuild without code).
* ``config``: the `QuantConfig` the model was quantized with (``QuantConfig.to_dict``), or None.
* ``layers``: per quantized layer, its format record (:mod:`.records`): ``kind``, ``format`` (display
  name), ``out_features``/``in_features``, ``weight`` (``QuantizedWeight.as_dict`` with its tensors
  replaced by ``{"codes": "<stored name>", ...}``), ``bias``, the kind's ``options`` and ``tensors``.
  No kernel op or op argument is named. Folded norm parameters are ordinary tensors of the model.
* ``tensors``: per stored tensor: a blake2b digest (corruption check) and its ``uses`` as a model
  tensor, ``[name, kind]`` with kind ``param`` or ``buffer`` (several: tied weights; none: a tensor
  only a layer record names).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._version import __version__
from ..formats import FormatError

FORMAT = "qbackend"
FORMAT_VERSION = 2
#: the oldest format this qbackend still reads (through :mod:`.legacy`)
OLDEST_FORMAT_VERSION = 1
METADATA_KEY = "qbackend"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""


def digest(t: torch.Tensor) -> str:
    """blake2b-128 of a tensor's bytes (row-major)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def new_manifest(model_info: dict[str, Any], config: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qbackend_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info,
        "config": None if config is None else config.to_dict(),
        "layers": {},
        "tensors": {},
    }


def parse_manifest(metadata: dict[str, str] | None, path: str) -> dict[str, Any]:
    """The manifest of a checkpoint's safetensors metadata; `CheckpointError` if absent, corrupt or too new."""
    if not metadata or METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: not a qbackend checkpoint (no {METADATA_KEY!r} entry in its metadata)")
    try:
        m = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt qbackend manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        what = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise CheckpointError(f"{path}: corrupt qbackend manifest (format is {what!r})")
    version = m.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: corrupt qbackend manifest (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by qbackend {m.get('qbackend_version', '?')} in checkpoint format {version}; "
            f"this qbackend reads format {FORMAT_VERSION}: upgrade qbackend"
        )
    if version < OLDEST_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version} is no longer supported; re-save it")
    for key in ("layers", "tensors", "model", *(("aliases",) if version == 1 else ())):
        if not isinstance(m.get(key), dict):
            raise CheckpointError(f"{path}: corrupt qbackend manifest (missing {key!r})")
    for name, entry in m["tensors"].items():
        _check_tensor_entry(name, entry, path)
    return m


def _check_tensor_entry(name: str, entry: Any, path: str) -> None:
    """A ``tensors`` entry: ``{"digest": str, "uses": [[name, "param"|"buffer"], ...]}`` (both formats)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
        raise CheckpointError(f"{path}: corrupt qbackend manifest: tensor {name!r} has no digest")
    uses = entry.get("uses")
    ok = isinstance(uses, list) and all(
        isinstance(u, list) and len(u) == 2 and isinstance(u[0], str) and u[1] in ("param", "buffer") for u in uses
    )
    if not ok:
        raise CheckpointError(
            f"{path}: corrupt qbackend manifest: tensor {name!r} has bad 'uses' (want [[name, 'param'|'buffer'], ...])"
        )


def read_records(layers: dict[str, Any], read: Callable[[str, Any], Any], path: str) -> dict[str, Any]:
    """``{name: read(name, js)}`` over a manifest's layers; a malformed record is a `CheckpointError` naming it."""
    out = {}
    for name, js in layers.items():
        try:
            out[name] = read(name, js)
        except FormatError as e:
            raise CheckpointError(f"{path}: layer {name!r}: {e}") from None
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
            if isinstance(e, CheckpointError):
                raise
            why = f"{type(e).__name__}: {e}"
            raise CheckpointError(f"{path}: corrupt record for quantized layer {name!r} ({why})") from None
    return out


def tensor_uses(
    manifest: dict[str, Any], tensors: Mapping[str, torch.Tensor], skip: tuple[str, ...] = ()
) -> list[tuple[str, str, torch.Tensor]]:
    """``(model tensor name, "param"|"buffer", tensor)`` for each use in the manifest's ``tensors``,
    but those under a prefix in ``skip``."""
    return [(n, kind, tensors[stored]) for stored, info in manifest["tensors"].items()
            for n, kind in info["uses"] if not (skip and n.startswith(skip))]  # fmt: skip
