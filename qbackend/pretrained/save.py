"""``qbackend.save_pretrained``: a quantized model as a Hugging Face directory, written atomically.

The directory: config.json (the model's config plus a ``quantization_config`` block), safetensors
shards (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and
``model.safetensors.index.json`` when over ``max_shard_size``), generation_config.json and tokenizer
files when there are some. Two layouts:

* "qbackend": the checkpoint format of :mod:`qbackend.serialization` (format 3: per quantized layer
  its format record, the other tensors as they are, the sealed manifest in every shard's header);
  ``qbackend.from_pretrained`` loads it without re-quantizing;
* "bitsandbytes": transformers' bitsandbytes 4-bit serialization (nf4/fp4 layers only), which
  transformers (``from_pretrained``) and peft load.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..serialization import FORMAT_VERSION, CheckpointError
from ..serialization.manifest import seal
from ..serialization.save import collect, sigterm_as_exit
from ..serialization.source import quantized_module
from . import bnb_layout, directory_swap
from .directory import INDEX_NAME, SINGLE_NAME
from .load import QUANT_METHOD

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja")  # fmt: skip
#: room for the safetensors headers and the JSON files, on top of the tensors' bytes
_HEADER_ROOM = 16 << 20


def save_pretrained(
    model: Any, save_directory: str | os.PathLike, *, options: Any = None, tokenizer: Any = None,
    max_shard_size: int | str = "2GB", layout: str = "qbackend", example_inputs: Any = None,
) -> Path:  # fmt: skip
    """Write ``model`` (a transformers model, quantized) to the directory ``save_directory``.

    model: quantized (``qbackend.from_pretrained``, ``qbackend.quantize_``), or float (quantized now
        with ``options`` on a copy, as :func:`qbackend.save` does; the user's model is not modified).
    tokenizer: a tokenizer (its ``save_pretrained`` writes its files) or a directory whose tokenizer
        files are copied through; None: none.
    max_shard_size: bytes per shard at most (an int, or "2GB", "500MB"); a single larger tensor gets a
        shard of its own.
    layout: "qbackend" (default) or "bitsandbytes" (transformers' 4-bit serialization; nf4/fp4 layers).

    Atomic: everything is written to a hidden directory next to ``save_directory`` and then swapped
    in, so an interrupted save leaves the previous directory as it was. Checks the free disk space
    first. Returns the directory.
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: is a file; give a directory")
    if not target.parent.is_dir():
        raise CheckpointError(f"{target.parent}: directory does not exist")
    limit = parse_size(max_shard_size)
    module, config = quantized_module(model, options or None, example_inputs)
    hf_config = getattr(module, "config", None)
    if not hasattr(hf_config, "to_dict"):
        raise CheckpointError(f"{target}: save_pretrained needs a transformers model (with a .config); "
                              "use qbackend.save for other models")  # fmt: skip
    if config is None:
        config = getattr(module, "qbackend_config", None)
    if layout == "qbackend":
        tensors, manifest = collect(module, config)
        metadata = {"format": "pt", **seal(manifest)}
        quant = {"quant_method": QUANT_METHOD, "version": __version__, "format_version": FORMAT_VERSION,
                 "config": manifest["config"]}  # fmt: skip
    elif layout == "bitsandbytes":
        tensors, quant = bnb_layout.state_dict_and_config(module)
        metadata = {"format": "pt"}
    else:
        raise ValueError(f"layout must be 'qbackend' or 'bitsandbytes'; got {layout!r}")
    config_json = json.loads(hf_config.to_json_string(use_diff=False))
    config_json["architectures"] = [type(module).__name__]
    config_json["quantization_config"] = quant
    shards = plan_shards(tensors, limit)
    _check_space(target, sum(t.numel() * t.element_size() for t in tensors.values()))
    with directory_swap.staged(target) as staging, sigterm_as_exit():
        _write_shards(staging, shards, tensors, metadata)
        (staging / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        generation = getattr(module, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(staging)
        _write_tokenizer(tokenizer, staging)
    return target


def parse_size(size: int | str) -> int:
    """Bytes of ``2000000``, ``"2GB"``, ``"500MB"``, ``"1.5GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)?\s*", str(size), re.IGNORECASE) if isinstance(size, str) else None
    if m is None:
        raise ValueError(f"max_shard_size must be a positive int or a size like '2GB'; got {size!r}")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    n = int(float(m.group(1)) * base**power)
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive; got {size!r}")
    return n


def plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most ``limit`` bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _check_space(target: Path, nbytes: int) -> None:
    need = nbytes + _HEADER_ROOM
    free = shutil.disk_usage(target.parent).free
    if free < need:
        raise CheckpointError(
            f"{target}: not enough disk space: the checkpoint needs {need / 2**30:.2f} GiB and "
            f"{target.parent} has {free / 2**30:.2f} GiB free; free some space or save elsewhere"
        )


def _write_shards(staging: Path, shards: list[list[str]], tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str]) -> None:  # fmt: skip
    from safetensors.torch import save_file  # deferred: only writing needs it

    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        fname = SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        path = staging / fname
        try:
            save_file({k: tensors[k] for k in names}, str(path), metadata=metadata)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise CheckpointError(
                    f"{path}: no space left on the device while writing tensor {names[0]!r} "
                    "and the rest; the previous directory is left as it was"
                ) from None
            raise
        weight_map.update(dict.fromkeys(names, fname))
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(tokenizer: Any, staging: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        source = Path(tokenizer)
        if not source.is_dir():
            raise CheckpointError(f"{source}: tokenizer= must be a tokenizer or a directory holding its files")
        copied = [f for f in TOKENIZER_FILES if (source / f).is_file()]
        if not copied:
            raise CheckpointError(f"{source}: holds no tokenizer file ({', '.join(TOKENIZER_FILES[:3])}, ...)")
        for f in copied:
            shutil.copy2(source / f, staging / f)
        return
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a tokenizer (with save_pretrained) or a directory; got "
                        f"{type(tokenizer).__name__}")  # fmt: skip
    tokenizer.save_pretrained(staging)
