"""Prepared (panel-packed) copies of int8 weight codes, made on first use and kept per weight tensor.

Shared by the kernels that read a packed layout of the codes (``w8a8.cpp``, ``int16_compute.cpp``): each has
its own :class:`PackedCache` (its own layout), with the same keying. A copy is made by the kernel's pack
function into a 64-byte aligned buffer, remade when the codes' address, version counter (in-place writes,
``copy_``, ``resize_``/``set_``), shape or object changes (as the prepared calls of ``fast_path.py`` are
keyed), and freed with the codes tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

#: (bytes of the copy for [n, k] codes, pack(codes ptr, n, k, copy ptr)): the kernel's two functions
Packer = tuple[Callable[[int, int], int], Callable[[int, int, int, int], None]]


class PackedCache:
    """Packed copies of int8 codes for one kernel layout (see the module docstring)."""

    def __init__(self, packer: Callable[[], Packer | None]) -> None:
        self._packer = packer  # the kernel's functions (None: no library); looked up only when a copy is made
        # id(codes) -> (weak reference to codes, its data_ptr, its version, n, k, the packed copy)
        self.entries: dict[int, tuple] = {}

    def get(self, codes: Tensor, n: int, k: int) -> Tensor | None:
        """The packed copy of ``codes`` [n, k] int8 (made now if it has none or it changed), or None: not a
        contiguous CPU int8 tensor of n * k codes, no library, or an inference tensor (no version counter to
        see an in-place write by: the caller's canonical kernel reads the codes instead)."""
        if codes.dtype is not torch.int8 or not codes.is_cpu or not codes.is_contiguous() or codes.numel() != n * k:
            return None
        base = codes._base
        if base is not None and base.data_ptr() == codes.data_ptr() and base.numel() == n * k and base.is_contiguous():
            codes = base  # a view made per call (``codes.view(-1)``) shares its base's bytes and version counter
        try:
            version = codes._version
        except RuntimeError:
            return None
        key = id(codes)
        e = self.entries.get(key)
        if e is not None and e[0]() is codes and e[1:5] == (codes.data_ptr(), version, n, k):
            return e[5]
        packer = self._packer()
        if packer is None:
            return None
        nbytes, pack = packer
        size = int(nbytes(n, k))
        buf = torch.empty(size + 64, dtype=torch.uint8)
        off = -buf.data_ptr() % 64  # the kernels load aligned panels
        packed = buf[off : off + size]
        pack(codes.data_ptr(), n, k, packed.data_ptr())
        entries = self.entries

        def drop(r: weakref.ref, key: int = key) -> None:
            if entries.get(key, (None,))[0] is r:
                entries.pop(key, None)

        entries[key] = (weakref.ref(codes, drop), codes.data_ptr(), version, n, k, packed)
        return packed

    def nbytes(self) -> int:
        """Bytes held by the copies alive now."""
        return sum(e[5].untyped_storage().nbytes() for e in list(self.entries.values()) if e[0]() is not None)
