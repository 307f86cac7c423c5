"""The JSON manifest of a qbackend checkpoint: what the tensors are and how to rebuild the model.

It rides in the safetensors header (``__metadata__["qbackend"]``), so a checkpoint is one file that
any safetensors reader opens. Fields (format 2):

* ``format``/``format_version``: "qbackend" and :data:`FORMAT_VERSION` (refused when newer; format 1
  is read by :mod:`.legacy`; format 2 is format 3 without the checks below).
* ``qbackend_version``, ``torch_version``, ``created``: provenance.
* ``model``: the model's class and, for transformers models, its config (to rebuild without code).
* ``config``: the `QuantConfig` the model was quantized with (``QuantConfig.to_dict``), or None.
* ``layers``: per quantized layer, its format record (:mod:`.records`): ``kind``, ``format`` (display
  name), ``out_features``/``in_features``, ``weight`` (``QuantizedWeight.as_dict`` with its tensors
  replaced by ``{"codes": "<stored name>", ...}``), ``bias``, the kind's ``options`` and ``tensors``.
  No kernel op or op argument is named. Folded norm parameters are ordinary tensors of the model.
* ``tensors``: per stored tensor: a blake2b digest (corruption check), its ``dtype`` and ``shape``
  (format 3) and its ``uses`` as a model tensor, ``[name, kind]`` with kind ``param`` or ``buffer``
  (several: tied weights; none: a tensor only a layer record names).

Integrity (format 3): the manifest text itself has a blake2b digest, stored next to it in the
metadata (``__metadata__["qbackend_digest"]``). Since the manifest holds every tensor's digest,
dtype and shape, one check covers the model class and config, the layer records, the aliases and
the tensors: any edit or bit flip is a `CheckpointError`, never a model that loads differently.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._version import __version__
from ..formats import FormatError, short_repr

FORMAT = "qbackend"
FORMAT_VERSION = 3
#: the oldest format this qbackend still reads (through :mod:`.legacy`)
OLDEST_FORMAT_VERSION = 1
METADATA_KEY = "qbackend"
#: metadata key of the manifest's digest (format 3)
DIGEST_KEY = "qbackend_digest"
#: the first format whose manifest must carry its digest
SEALED_SINCE = 3


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""


def digest(t: torch.Tensor) -> str:
    """blake2b-128 of a tensor's bytes (row-major)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def text_digest(text: str) -> str:
    """blake2b-128 of a manifest's JSON text (as stored)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata holding ``manifest`` and its digest."""
    text = json.dumps(manifest, sort_keys=True)
    return {METADATA_KEY: text, DIGEST_KEY: text_digest(text)}


def tensor_entry(t: torch.Tensor) -> dict[str, Any]:
    """A new ``tensors`` entry for a stored tensor (no uses yet)."""
    return {"digest": digest(t), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "uses": []}


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
    """The manifest of a checkpoint's safetensors metadata; `CheckpointError` if absent, corrupt or too new.

    Checks the manifest's digest (format 3; any format when present) and the type of every field
    the reader uses, so a malformed field is a `CheckpointError` here, not a raw error later.
    """
    if not metadata or METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: not a qbackend checkpoint (no {METADATA_KEY!r} entry in its metadata)")
    text = metadata[METADATA_KEY]
    sealed = DIGEST_KEY in metadata
    if sealed and metadata[DIGEST_KEY] != text_digest(text):
        raise CheckpointError(f"{path}: corrupt checkpoint: the qbackend manifest does not match its checksum")
    try:
        m = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt qbackend manifest ({_first_line(e)})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        what = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise CheckpointError(f"{path}: corrupt qbackend manifest (format is {short_repr(what)})")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: corrupt qbackend manifest (format_version {short_repr(version)})")
    if version > FORMAT_VERSION:
        writer = m.get("qbackend_version")
        writer = writer if isinstance(writer, str) and len(writer) <= 40 else "?"
        raise CheckpointError(
            f"{path}: written by qbackend {writer} in checkpoint format "
            f"{version}; this qbackend reads format {FORMAT_VERSION}: upgrade qbackend"
        )
    if version < OLDEST_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version} is no longer supported; re-save it")
    if version >= SEALED_SINCE and not sealed:
        raise CheckpointError(f"{path}: corrupt checkpoint: format {version} but the manifest has no checksum")
    for key in ("layers", "tensors", "model", *(("aliases",) if version == 1 else ())):
        if not isinstance(m.get(key), dict):
            raise CheckpointError(f"{path}: corrupt qbackend manifest (missing {key!r})")
    for name, entry in m["tensors"].items():
        _check_tensor_entry(name, entry, path, version >= SEALED_SINCE)
    for name, js in m["layers"].items():
        if not isinstance(js, dict):
            raise CheckpointError(f"{path}: corrupt qbackend manifest: layer {short_repr(name)} is not a record")
    if version == 1 and not all(isinstance(k, str) and isinstance(v, str) for k, v in m["aliases"].items()):
        raise CheckpointError(f"{path}: corrupt qbackend manifest: 'aliases' must map names to names")
    _check_model_info(m["model"], path)
    if version >= 2 and "config" in m and m["config"] is not None and not isinstance(m["config"], dict):
        raise CheckpointError(f"{path}: corrupt qbackend manifest: 'config' is {type(m['config']).__name__}")
    return m


def _check_model_info(info: dict[str, Any], path: str) -> None:
    """``model``: ``class`` (str), and for transformers models ``transformers_class`` (a class name)
    and ``transformers_config`` (a dict)."""
    for key in ("class", "transformers_class"):
        if key in info and not isinstance(info[key], str):
            raise CheckpointError(f"{path}: corrupt qbackend manifest: model {key!r} is {type(info[key]).__name__}")
    cls = info.get("transformers_class")
    if cls is not None and not cls.isidentifier():
        raise CheckpointError(f"{path}: corrupt qbackend manifest: model class {short_repr(cls)} is not a class name")
    cfg = info.get("transformers_config")
    if cfg is not None and not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: corrupt qbackend manifest: transformers_config is {type(cfg).__name__}")


def _check_tensor_entry(name: str, entry: Any, path: str, typed: bool) -> None:
    """A ``tensors`` entry: ``{"digest": str, "uses": [[name, "param"|"buffer"], ...]}`` (+ ``dtype``,
    ``shape`` when ``typed``)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
        raise CheckpointError(f"{path}: corrupt qbackend manifest: tensor {short_repr(name)} has no digest")
    uses = entry.get("uses")
    ok = isinstance(uses, list) and all(
        isinstance(u, list) and len(u) == 2 and isinstance(u[0], str) and u[1] in ("param", "buffer") for u in uses
    )
    if not ok:
        raise CheckpointError(
            f"{path}: corrupt qbackend manifest: tensor {short_repr(name)} has bad 'uses' "
            "(want [[name, 'param'|'buffer'], ...])"
        )
    if typed:
        shape = entry.get("shape")
        if not isinstance(entry.get("dtype"), str) or not (
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise CheckpointError(f"{path}: corrupt qbackend manifest: tensor {short_repr(name)} has no dtype/shape")


def check_tensor(name: str, t: torch.Tensor, entry: dict[str, Any], path: str) -> None:
    """`CheckpointError` unless ``t`` has the dtype, shape (format 3) and digest its entry records."""
    if "dtype" in entry:
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype != entry["dtype"] or list(t.shape) != entry["shape"]:
            raise CheckpointError(
                f"{path}: corrupt checkpoint: tensor {name!r} is {dtype} {list(t.shape)} in the file but "
                f"{short_repr(entry['dtype'])} {entry['shape'][:8]} in the manifest"
            )
    if digest(t) != entry["digest"]:
        raise CheckpointError(f"{path}: corrupt checkpoint: tensor {name!r} does not match its checksum")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


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
