"""The JSON manifest of a qbackend checkpoint: what the tensors are and how to rebuild the model.

It rides in the safetensors header (``__metadata__["qbackend"]``), so a checkpoint is one file that
any safetensors reader opens. Fields:

* ``format``/``format_version``: "qbackend" and :data:`FORMAT_VERSION` (refused when newer).
* ``qbackend_version``, ``torch_version``, ``created``: provenance.
* ``model``: the model's class and, for transformers models, its config (to rebuild without code).
* ``config``: the `QuantConfig` the model was quantized with (text), when known.
* ``smoothquant``: W8A8 only: the SmoothQuant settings and which calibration they used.
* ``layers``: per `QuantizedLinear`: op, int arguments, tensor argument names, scheme, bias; per
  `W8A8Linear` (``"kind": "w8a8"``): op, format, activation mode, outlier threshold, whether its
  input has an explicit smoothing multiply, how it was smoothed, bias. Folded norm parameters are
  ordinary tensors of the model.
* ``tensors``: per stored tensor: a blake2b digest (corruption check) and its uses, ``[name, kind]``
  with kind ``param`` or ``buffer`` (several uses: tied weights, shared code tables).
* ``aliases``: every other name of a stored tensor -> the name it is stored under.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from typing import Any

import torch

FORMAT = "qbackend"
FORMAT_VERSION = 1
METADATA_KEY = "qbackend"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""


def digest(t: torch.Tensor) -> str:
    """blake2b-128 of a tensor's bytes (row-major)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def config_text(config: Any) -> str | None:
    """A JSON text of a `QuantConfig` (fields that are not JSON, e.g. calibration results, as repr)."""
    if config is None:
        return None
    try:
        return config.fingerprint()
    except (TypeError, ValueError):
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return json.dumps(fields, sort_keys=True, default=repr)


def smoothquant_record(config: Any) -> dict[str, Any] | None:
    """The W8A8 settings of ``config`` as JSON (None for weight-only configs or none)."""
    sq = getattr(config, "smoothquant", None)
    if sq is None:
        return None
    cal = config.calibration
    return {
        "settings": dataclasses.asdict(sq),
        "calibration": None if cal is None else {"fingerprint": cal.fingerprint(), "num_batches": cal.num_batches,
                                                  "layers": len(cal.layers)},  # fmt: skip
    }


def new_manifest(model_info: dict[str, Any], config: Any) -> dict[str, Any]:
    import qbackend

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qbackend_version": qbackend.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info,
        "config": config_text(config),
        "smoothquant": smoothquant_record(config),
        "layers": {},
        "tensors": {},
        "aliases": {},
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
        raise CheckpointError(f"{path}: corrupt qbackend manifest (format is {m.get('format')!r})")
    version = m.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: corrupt qbackend manifest (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by qbackend {m.get('qbackend_version', '?')} in checkpoint format {version}; "
            f"this qbackend reads format {FORMAT_VERSION}: upgrade qbackend"
        )
    if version < FORMAT_VERSION:  # no older format exists yet; keep the message ready for one
        raise CheckpointError(f"{path}: checkpoint format {version} is no longer supported; re-save it")
    for key in ("layers", "tensors", "aliases", "model"):
        if not isinstance(m.get(key), dict):
            raise CheckpointError(f"{path}: corrupt qbackend manifest (missing {key!r})")
    return m
