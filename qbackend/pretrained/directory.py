"""A Hugging Face model directory on disk: its config.json and the tensors of its safetensors shards.

Only headers are read here (names, dtypes, shapes, where each tensor lives); a tensor's bytes are
read by :meth:`ShardSet.read`, one tensor at a time, so a caller holds one float tensor at most.
Every problem found here names the file (and tensor) it is about.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..serialization import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def resolve_directory(model_dir_or_id: str | os.PathLike) -> Path:
    """A local directory, or a Hub id found in the local Hugging Face cache (never downloaded)."""
    path = Path(model_dir_or_id)
    if path.is_dir():
        return path
    text = str(model_dir_or_id)
    if path.exists():
        raise CheckpointError(f"{path}: is a file; give the model directory (config.json + safetensors shards)")
    looks_like_id = text.count("/") <= 1 and not text.startswith((".", "/", "~")) and not text.endswith(".safetensors")
    if not looks_like_id:
        raise CheckpointError(f"{path}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # noqa: BLE001  (any failure means: not in the cache)
        raise CheckpointError(
            f"{text!r}: not a local directory and not in the local Hugging Face cache; qbackend does not "
            f"download: fetch it first (huggingface-cli download {text}) or pass the directory"
        ) from None


def read_config(directory: Path) -> dict[str, Any]:
    """The directory's config.json as a dict."""
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing; a Hugging Face model directory needs its config.json")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is."""

    file: Path
    dtype: str  # safetensors' name: F16, BF16, F32, U8, ...
    shape: tuple[int, ...]
    nbytes: int


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}  # fmt: skip


class ShardSet:
    """The safetensors shards of a directory (per its index json when there is one), headers read.

    Raises `CheckpointError` for a shard the index names that is missing, an unreadable or truncated
    shard, a tensor stored twice, and a tensor the index places in another file than holds it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.index_path: Path | None = None
        files, expected = self._files(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for f in files:
            self._read_header(f)
        for key, fname in expected.items():
            info = self.tensors.get(key)
            if info is None or info.file.name != Path(fname).name:
                raise CheckpointError(
                    f"{directory / fname}: the index {INDEX_NAME} places tensor {key!r} there, but the file "
                    "does not hold it; the shard is not the one the index was written with"
                )

    def _files(self, directory: Path) -> tuple[list[Path], dict[str, str]]:
        index = directory / INDEX_NAME
        if index.exists():
            self.index_path = index
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
            files = []
            for key, fname in weight_map.items():
                f = directory / str(fname)
                if f not in files:
                    if not f.exists():
                        raise CheckpointError(
                            f"{f}: missing shard (the index {INDEX_NAME} puts tensor {key!r} and others there)"
                        )
                    files.append(f)
            return sorted(files), dict(weight_map)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: holds no .safetensors file (and no {INDEX_NAME})")
        return files, {}

    def _read_header(self, f: Path) -> None:
        from safetensors import SafetensorError, safe_open  # deferred: only reading a file needs it

        try:
            with safe_open(str(f), framework="pt") as st:
                self.metadata[f] = st.metadata() or {}
                for key in st.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    sl = st.get_slice(key)
                    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                    if key in self.tensors:
                        raise CheckpointError(f"{f}: tensor {key!r} is stored in {self.tensors[key].file.name} too")
                    n = 1
                    for d in shape:
                        n *= d
                    self.tensors[key] = TensorInfo(f, dtype, shape, n * _ITEMSIZE.get(dtype, 1))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            size = f.stat().st_size if f.exists() else 0
            raise CheckpointError(
                f"{f}: not a readable safetensors file ({size} bytes; truncated or corrupt?): {e}"
            ) from None

    @property
    def files(self) -> list[Path]:
        return list(self.metadata)

    def keys_in_file_order(self) -> list[str]:
        """Every stored tensor name, shard by shard (each shard's tensors in its header's order)."""
        order = {f: i for i, f in enumerate(self.metadata)}
        return sorted(self.tensors, key=lambda k: order[self.tensors[k].file])

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` in its stored dtype, on the CPU.

        The shard is mapped for this one read and unmapped after, so the pages of tensors read
        earlier do not pile up in the process's resident memory.
        """
        from safetensors import SafetensorError, safe_open

        info = self.tensors[key]
        try:
            with safe_open(str(info.file), framework="pt") as st:
                return st.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {key!r}: {e}") from None
