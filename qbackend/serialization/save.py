"""``qbackend.save``: a quantized model as one safetensors file with a JSON manifest in its header."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layers import layer_record
from .manifest import CheckpointError, new_manifest, seal, tensor_entry
from .records import record_to_json
from .source import quantized_module


def save(model: Any, path: str | os.PathLike, *, example_inputs: Any = None, **options: Any) -> Path:
    """Save a quantized model to ``path`` (a ``.safetensors`` file; written to a temp file, then renamed).

    model: a module quantized with :func:`qbackend.quantize_`, or a float / ``torch.compile``d module
        (quantized now with ``options``, else its qbackend compile options, else the defaults; the
        user's model is not modified).
    example_inputs: W8A8 with SmoothQuant only: one batch to trace the model on to fold the scales
        as the backend does (default: the calibration's first batch).

    Stored: per quantized layer its format record (the weight's scheme, shape and named tensors:
    codes and constants, nested ones included, never a float weight; bias; W8A8/QAT activation
    settings), every other parameter and buffer of the model (e.g. folded scales), and a JSON
    manifest (format version, config, model class and transformers config, checksums). Load with
    :func:`qbackend.load`.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give a file name such as {path / 'model.safetensors'}")
    if not path.parent.exists():
        raise CheckpointError(f"{path.parent}: directory does not exist")
    module, config = quantized_module(model, options or None, example_inputs)
    tensors, manifest = collect(module, config)
    _atomic_save(tensors, seal(manifest), path)
    return path


def collect(module: nn.Module, config: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to store (each once, contiguous, on the CPU) and the manifest of a quantized module.

    Shared by ``qbackend.save`` (one file) and ``qbackend.save_pretrained`` (a sharded directory).
    """
    manifest = new_manifest(model_info(module), config)
    store = _Store(manifest["tensors"])
    for name, m in module.named_modules(remove_duplicate=False):
        rec = layer_record(m, name)
        if rec is not None:
            manifest["layers"][name] = record_to_json(name, rec, store.add)
    quantized = set(manifest["layers"])
    named = [(n, t, "param") for n, t in module.named_parameters(remove_duplicate=False)]
    named += [(n, t, "buffer") for n, t in module.named_buffers(remove_duplicate=False) if t is not None]
    for name, t, kind in named:
        if name.rpartition(".")[0] not in quantized:  # a quantized layer's tensors are in its record
            store.add(name, t, [name, kind])
    return store.tensors, manifest


def model_info(module: nn.Module) -> dict[str, Any]:
    cls = type(module)
    info: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    cfg = getattr(module, "config", None)
    if cls.__module__.startswith("transformers.") and hasattr(cfg, "to_json_string"):
        info["transformers_class"] = cls.__name__
        info["transformers_config"] = json.loads(cfg.to_json_string(use_diff=False))
    return info


class _Store:
    """The tensors to write, each once: a tensor met again (tied weights, shared constants) keeps its first name."""

    def __init__(self, entries: dict[str, Any]) -> None:
        self.entries = entries  # the manifest's "tensors"
        self.tensors: dict[str, torch.Tensor] = {}
        self._seen: dict[tuple, str] = {}
        self._storages: set[int] = set()

    def add(self, name: str, t: torch.Tensor, use: list[str] | None = None) -> str:
        if t.device.type == "meta":
            raise CheckpointError(f"{name}: is on the meta device (no data to save); load or initialise it first")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        stored = self._seen.get(key)
        if stored is None:
            if name in self.tensors:
                raise CheckpointError(f"{name}: two different tensors would be stored under this name")
            stored = self._seen[key] = name
            ptr = t.untyped_storage().data_ptr()
            # safetensors refuses tensors sharing memory: other views of one storage are stored as copies.
            partial = t.untyped_storage().nbytes() != t.numel() * t.element_size()
            t = t.clone() if t.numel() and (ptr in self._storages or partial) else t.contiguous()
            self._storages.add(ptr)
            t = self.tensors[name] = t.cpu()
            self.entries[name] = tensor_entry(t)
        if use is not None:
            self.entries[stored]["uses"].append(use)
        return stored


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write to a hidden temp file next to ``path``, then rename: a reader never sees a half-written file.

    An interrupted save removes its temp file (Ctrl-C, an exception, and SIGTERM: turned into an
    exception while saving, when the process has no handler of its own); a save killed outright
    (SIGKILL) leaves it, and the next save into that directory removes it (the temp name holds the
    writer's pid).
    """
    from safetensors.torch import save_file  # deferred: only writing a file needs it

    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with sigterm_as_exit():
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_orphans(path: Path) -> None:
    """Delete temp files of earlier saves to ``path`` whose writing process no longer exists."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """While saving, SIGTERM raises SystemExit (so the temp file is removed) if nobody handles it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
