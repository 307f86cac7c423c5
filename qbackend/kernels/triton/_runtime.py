"""Which copy of the kernels runs a call: compiled (CUDA) or the Triton interpreter (CPU tensors).

``triton.jit`` decides between compiling and interpreting when the decorator runs, i.e. at import.
So that CPU tensors work whatever ``TRITON_INTERPRET`` was at import time (a test module may set it
after something else imported this package), a second copy of ``_kernels`` is loaded with the
interpreter switched on the first time a CPU tensor arrives.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from types import ModuleType

import torch

from . import _kernels

_lock = threading.Lock()
_interpreted: ModuleType | None = None
_compiled: ModuleType | None = None


def _is_interpreted(mod: ModuleType) -> bool:
    from triton.runtime.interpreter import InterpretedFunction  # triton is optional (CUDA)

    return isinstance(mod.wo_gemv_kernel, InterpretedFunction)


def interpret_env() -> bool:
    """True when TRITON_INTERPRET asks for the interpreter everywhere."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _load_copy(interpret: bool, suffix: str) -> ModuleType:
    """A fresh copy of ``_kernels`` decorated with the interpreter switched on or off."""
    spec = importlib.util.spec_from_file_location(_kernels.__name__ + suffix, _kernels.__file__)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return mod


def _load_interpreted() -> ModuleType:
    global _interpreted
    with _lock:
        if _interpreted is None:
            _interpreted = _kernels if _is_interpreted(_kernels) else _load_copy(True, "_interpreted")
        return _interpreted


def compiled_kernels() -> ModuleType:
    """The kernels as JITFunctions (for ahead-of-time compilation), even in an interpreter process."""
    global _compiled
    with _lock:
        if _compiled is None:
            _compiled = _load_copy(False, "_compiled") if _is_interpreted(_kernels) else _kernels
        return _compiled


def kernels_for(device: torch.device) -> tuple[ModuleType, bool]:
    """(kernel module, interpreted?) for tensors on ``device``."""
    if device.type == "cuda" and not _is_interpreted(_kernels):
        return _kernels, False
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"qbackend Triton kernels run on CUDA (or on CPU through the interpreter), not {device}")
    return _load_interpreted(), True
