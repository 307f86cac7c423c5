"""What a weight looked like when it was quantized, and a cheap per-call test that it still does.

A `WeightStamp` holds three witnesses of a tensor's value:

* ``_version`` and the storage address: free, and they catch in-place ops, ``param.copy_``,
  ``load_state_dict``, optimizer steps, a replaced Parameter, ``model.to()``, ``.data = other``;
* a sampled fingerprint: a few hundred bytes read at fixed places of the weight's memory. It catches
  what bypasses the version counter (``w.data.mul_``, ``w.data[...] = v``, ``w.data.copy_``, numpy
  views, tensors made under ``torch.inference_mode``) whenever the write touches a sampled byte:
  every whole-tensor update (EMA, weight sync, rescaling) does; a write to a few elements may not;
* in ``"full"`` mode (strict), a checksum of every byte, recomputed on each call (slow; exact).

On the CPU the fingerprint is read through ctypes views (no torch op). On CUDA each weight's runs are
read by address: a compiled graph's guard defers them (:class:`DeviceProbes`) and reads every
weight's runs in one Triton launch with one device sync per call, instead of a sync per weight.

Checks (``QuantConfig.weight_check``): ``"sampled"`` (default: version, address and fingerprint),
``"full"`` (also the checksum of every byte), ``"version"`` (version and address only: free, misses
``.data`` writes).

Anything that holds a stamp of a parameter registers with :func:`watch`, so :func:`refresh` can
force it to re-read the parameter (``qbackend.refresh(model)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import weakref
import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch.utils.weak import WeakIdKeyDictionary

#: the per-call checks a compiled model can run on its quantized weights
WEIGHT_CHECKS: tuple[str, ...] = ("sampled", "full", "version")
# Sampled fingerprint: RUNS reads of RUN_BYTES spread over a contiguous tensor (or ELEMENTS single
# elements of a strided one). Reading ~0.5 KiB per weight costs ~0.1 us per read on the CPU.
RUNS, RUN_BYTES, ELEMENTS = 8, 64, 32


def version_of(t: torch.Tensor | None) -> int:
    """``t._version``; -1 for a tensor without a version counter (inference tensors), 0 for None."""
    if t is None:
        return 0
    try:
        return t._version
    except RuntimeError:
        return -1


class WeightStamp:
    """Version, address and fingerprint of one tensor, taken BEFORE it is read for quantizing (so a
    write landing during the quantization is seen on the next check)."""

    __slots__ = ("version", "ptr", "_cells", "_sample", "_index", "_addrs", "_full", "invalid", "__weakref__")

    def __init__(self, t: torch.Tensor, full: bool = False) -> None:
        t = t.detach() if t.requires_grad else t
        self.version = version_of(t)
        self.ptr = t.data_ptr()
        self.invalid = False
        self._cells: list | None = None
        self._index: torch.Tensor | None = None
        self._addrs: torch.Tensor | None = None  # device memory: absolute addresses of the sampled runs
        self._sample: object = None
        if t.numel() == 0 or t.device.type == "meta":
            pass
        elif _probed(t):
            self._addrs, self._sample = _device_runs(t)
        elif t.device.type == "cpu":
            self._cells = _cpu_cells(t)
            self._sample = [c.raw for c in self._cells]
        else:  # small or strided device tensors: gather on the device (one sync per weight)
            self._index = sample_positions(t.numel()).to(t.device)
            self._sample = t.reshape(-1)[self._index].clone()
        self._full = checksum(t) if full else None

    def matches(self, t: torch.Tensor, check: str = "sampled") -> bool:
        """Whether ``t`` still looks as stamped (``check``: see the module docstring)."""
        if self.invalid or t.data_ptr() != self.ptr or version_of(t) != self.version:
            return False
        if check == "version":
            return True
        # Same address, so the memory the cells read is t's own (alive during this call).
        if self._cells is not None:
            if [c.raw for c in self._cells] != self._sample:
                return False
        elif self._addrs is not None:
            probes = _collecting.get()
            if probes is not None and check == "sampled":
                probes.defer(self)  # compared with every other deferred stamp after the loop: one sync
            elif not torch.equal(_read_runs(self._addrs), self._sample):
                return False
        elif self._index is not None and not torch.equal(t.reshape(-1)[self._index], self._sample):
            return False
        if check == "full":
            if self._full is None:  # first strict check of a stamp taken in another mode
                self._full = checksum(t)
            return checksum(t) == self._full
        return True


# Devices whose weights are fingerprinted by byte runs read in one batched launch (Triton).
PROBED_DEVICES = {"cuda"}


def _probed(t: torch.Tensor) -> bool:
    return t.device.type in PROBED_DEVICES and t.is_contiguous() and t.numel() * t.element_size() >= RUN_BYTES


def _run_starts(nbytes: int) -> list[int]:
    """RUNS byte offsets spread over [0, nbytes - RUN_BYTES] (repeats allowed: a fixed count per tensor)."""
    return [(nbytes - RUN_BYTES) * i // (RUNS - 1) for i in range(RUNS)]


def _device_runs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 addresses [RUNS], their bytes uint8 [RUNS, RUN_BYTES]) of a contiguous device tensor."""
    starts = _run_starts(t.numel() * t.element_size())
    raw = t.reshape(-1).view(torch.uint8)
    sample = torch.stack([raw[s : s + RUN_BYTES] for s in starts])
    return torch.tensor([t.data_ptr() + s for s in starts], dtype=torch.int64, device=t.device), sample


def _read_runs(addrs: torch.Tensor) -> torch.Tensor:
    from ..kernels.triton.probe import read_byte_runs  # triton is optional; only probed devices get here

    return read_byte_runs(addrs, RUN_BYTES)


class DeviceProbes:
    """Defers the device fingerprint reads of a batch of checks, then does them all in one launch per
    device and one sync: ``with probes.collecting(): ...checks...`` then :meth:`stale`.

    The concatenated addresses are kept while the same stamps come in the same order (every call of a
    compiled graph), so a call costs the launch, the compare and the sync only.
    """

    def __init__(self) -> None:
        self.deferred: list[WeightStamp] = []
        self._key: tuple[int, ...] = ()
        self._kept: list[WeightStamp] = []  # holds the stamps of _key alive (ids stay unique)
        self._groups: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []  # (positions, addrs, sample)

    def defer(self, stamp: WeightStamp) -> None:
        self.deferred.append(stamp)

    def collecting(self) -> contextlib.AbstractContextManager[DeviceProbes]:
        self.deferred = []
        return _collect(self)

    def stale(self) -> set[int]:
        """Positions (in :attr:`deferred`) of stamps whose memory no longer holds the stamped bytes."""
        if not self.deferred:
            return set()
        key = tuple(id(s) for s in self.deferred)
        if key != self._key:
            self._key, self._kept = key, list(self.deferred)
            by_device: dict[torch.device, list[int]] = {}
            for i, st in enumerate(self.deferred):
                by_device.setdefault(st._addrs.device, []).append(i)  # type: ignore[union-attr]
            self._groups = [
                (pos, torch.cat([self.deferred[i]._addrs for i in pos]),  # type: ignore[misc]
                 torch.cat([self.deferred[i]._sample for i in pos]))  # type: ignore[misc]
                for pos in by_device.values()
            ]  # fmt: skip
        out: set[int] = set()
        for pos, addrs, sample in self._groups:
            differs = (_read_runs(addrs) != sample).view(len(pos), -1).any(dim=1)
            if bool(differs.any()):  # the one sync of this device
                out.update(p for p, d in zip(pos, differs.tolist(), strict=True) if d)
        return out


_collecting: contextvars.ContextVar[DeviceProbes | None] = contextvars.ContextVar("qbackend_probes", default=None)


@contextlib.contextmanager
def _collect(probes: DeviceProbes) -> Iterator[DeviceProbes]:
    token = _collecting.set(probes)
    try:
        yield probes
    finally:
        _collecting.reset(token)


def sample_positions(numel: int) -> torch.Tensor:
    """Up to ELEMENTS distinct flat indices spread evenly over ``[0, numel)`` (int64 arithmetic: an fp32
    ``linspace`` rounds ``numel - 1`` up past the end once numel exceeds 2**24)."""
    steps = torch.arange(ELEMENTS, dtype=torch.int64)
    return (steps * (numel - 1) // (ELEMENTS - 1)).unique()


def _cpu_cells(t: torch.Tensor) -> list:
    """ctypes views of the sampled bytes of a CPU tensor (fixed addresses inside its memory)."""
    size = t.element_size()
    base = t.data_ptr()
    if t.is_contiguous():
        nbytes = t.numel() * size
        run = min(RUN_BYTES, nbytes)
        starts = sorted({(nbytes - run) * i // max(RUNS - 1, 1) for i in range(RUNS)})
        return [(ctypes.c_char * run).from_address(base + s) for s in starts]
    flat = sample_positions(t.numel()).tolist()
    cells = []
    for i in flat:
        offset = 0
        for dim, stride in zip(reversed(t.shape), reversed(t.stride()), strict=True):
            offset += (i % dim) * stride
            i //= dim
        cells.append((ctypes.c_char * size).from_address(base + offset * size))
    return cells


def checksum(t: torch.Tensor) -> int:
    """CRC-32 of every byte of ``t`` (row-major); a copy for device or non-contiguous tensors."""
    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(memoryview(data.numpy()))


def check_mode(config: object) -> str:
    """The ``weight_check`` of a config (a workflow's own config may not have one: the default)."""
    return getattr(config, "weight_check", None) or "sampled"


# ---- refresh ------------------------------------------------------------------------------------


class Watcher(Protocol):
    """Something derived from a parameter that :func:`refresh` must bring up to date (or invalidate)."""

    def refresh(self, param: torch.Tensor) -> None: ...


_watchers: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> WeakSet of watchers


def watch(param: torch.Tensor, watcher: Watcher) -> None:
    """Register ``watcher`` (held weakly) as derived from ``param``."""
    ws = _watchers.get(param)
    if ws is None:
        ws = _watchers[param] = weakref.WeakSet()
    ws.add(watcher)


def refresh(params: Iterable[torch.Tensor]) -> int:
    """Re-read each of ``params`` into everything derived from it; returns how many were refreshed."""
    n = 0
    for p in params:
        for w in list(_watchers.get(p, ())):
            w.refresh(p)
            n += 1
    return n


class FoldedCheck:
    """A parameter copied into constants that cannot be refreshed from it alone (SmoothQuant folds,
    Inductor freezing): a change, or :func:`refresh`, makes :meth:`ok` false, and the guard raises."""

    __slots__ = ("name", "stamp", "__weakref__")

    def __init__(self, name: str, param: torch.Tensor, check: str) -> None:
        self.name = name
        self.stamp = WeightStamp(param, full=check == "full")
        watch(param, self)

    def ok(self, param: torch.Tensor, check: str) -> bool:
        return self.stamp.matches(param, check)

    def refresh(self, param: torch.Tensor) -> None:
        self.stamp.invalid = True  # cannot re-fold: the next call raises (recompile)
