"""Quantized weights, made once per (parameter, format, orientation) and shared.

Every compile of the same model (no_grad and grad graphs, recompiles for new shapes, graph-break
subgraphs, ``qbackend.explain``) gets the same `QuantEntry` for a parameter, so its quantized
tensors exist once in memory and an in-place re-quantization updates every compiled graph. Entries
are held weakly: they live as long as a compiled graph (or the caller) uses them and the parameter
exists. Nothing here keeps a float copy of a weight.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..formats import QuantizedWeight, Scheme, quantize
from ..kernels import KernelWeight, prepare_weight
from .weight_stamp import WeightStamp, version_of, watch

__all__ = ["QuantEntry", "StaleWeightError", "get_entry", "version_of"]


class StaleWeightError(RuntimeError):
    """A weight was changed in place after compiling and cannot (or must not) be re-quantized."""


_entries: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> {(scheme, transposed, key): weakref(entry)}


@dataclass(eq=False)
class QuantEntry:
    """A parameter's quantized form and the stamp of the parameter it was made from.

    kw.tensors are updated IN PLACE by :meth:`refresh`, so graphs that registered them see new values.
    The stamp is taken before reading the parameter, so a write racing a re-quantization is seen on
    the next check; concurrent refreshes of one entry are serialised.
    """

    name: str
    scheme: Scheme
    transposed: bool
    kw: KernelWeight
    storage_bits: int
    numel: int
    stamp: WeightStamp
    rel_error: float | None = None
    quantizer: Any = None  # a calibrated method's ``quantizer(w [N, K]) -> QuantizedWeight`` (None: round to nearest)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def bits_per_param(self) -> float:
        return self.storage_bits / self.numel

    @property
    def nbytes(self) -> int:
        return (self.storage_bits + 7) // 8

    def is_stale(self, param: torch.Tensor, check: str = "sampled") -> bool:
        """Cheap per-call check (see :mod:`.weight_stamp`): the parameter changed since quantizing."""
        return not self.stamp.matches(param, check)

    def refresh(self, param: torch.Tensor, check: str | None = None) -> None:
        """Re-quantize from the parameter's current value into the existing tensors (same shapes).

        ``check``: refresh only if still stale by that check once the lock is held (another thread
        may have just refreshed); None: always.
        """
        with self._lock:
            if check is not None and self.stamp.matches(param, check):
                return
            stamp = WeightStamp(param, full=self.stamp._full is not None)
            qw = _quantize(param, self.scheme, self.transposed, self.name, self.quantizer)
            kw = prepare_weight(qw)
            for old, new, tname in zip(self.kw.tensors, kw.tensors, kw.names, strict=True):
                if old is None or new is None:
                    if old is not new:
                        raise StaleWeightError(f"{self.name}: re-quantized {tname} changed presence; recompile "
                                               "the model (torch._dynamo.reset())")  # fmt: skip
                    continue
                if old is new:  # a shared code table
                    continue
                if old.shape != new.shape or old.dtype != new.dtype:
                    raise StaleWeightError(
                        f"{self.name}: re-quantized {tname} has shape {tuple(new.shape)} {new.dtype}, was "
                        f"{tuple(old.shape)} {old.dtype}; recompile the model (torch._dynamo.reset())"
                    )
                with torch.no_grad():
                    old.copy_(new)
            self.stamp = stamp
            self.rel_error = None

    def relative_error(self, param: torch.Tensor) -> float:
        """||W - dequant(W_q)|| / ||W|| (Frobenius); measured once (temporary fp32 copies), then remembered."""
        if self.rel_error is None:
            self.rel_error = _rel_error(effective_weight(param, self.transposed), dequantize_kernel_weight(self.kw))
        return self.rel_error


def get_entry(
    param: torch.Tensor, scheme: Scheme, transposed: bool, name: str, measure_error: bool = False,
    quantizer: Callable[[torch.Tensor], QuantizedWeight] | None = None,
) -> QuantEntry:  # fmt: skip
    """The shared entry for ``param`` in ``scheme`` (quantizing now if none is alive or it is stale).

    ``measure_error``: also record the relative weight error (one dequantization; for reports).
    ``quantizer``: a calibrated method (GPTQ) rounding the ``[N, K]`` weight instead of round to
    nearest; entries are told apart by its ``key`` attribute.

    Raises `qbackend.formats.FormatError` (bad values, e.g. NaN, naming ``name``) or
    `qbackend.kernels.UnsupportedWeight`.
    """
    per_param = _entries.get(param)
    if per_param is None:
        per_param = {}
        _entries[param] = per_param
    key = (scheme, transposed, getattr(quantizer, "key", None))
    ref = per_param.get(key)
    entry = ref() if ref is not None else None
    if entry is not None:
        if entry.is_stale(param):
            entry.refresh(param, "sampled")
        return entry
    stamp = WeightStamp(param)  # before reading it: a concurrent write is seen on the next check
    qw = _quantize(param, scheme, transposed, name, quantizer)
    kw = prepare_weight(qw)
    entry = QuantEntry(name, scheme, transposed, kw, qw.storage_bits(), qw.numel, stamp, quantizer=quantizer)
    watch(param, entry)
    if measure_error:
        entry.rel_error = _rel_error(effective_weight(param, transposed), qw.dequantize(torch.float32))
    per_param[key] = weakref.ref(entry)
    return entry


def effective_weight(param: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The linear's ``[out, in]`` weight: the parameter, or its transpose when stored ``[in, out]``."""
    return param.detach().t() if transposed else param.detach()


def _quantize(
    param: torch.Tensor, scheme: Scheme, transposed: bool, name: str, quantizer: Any = None
) -> QuantizedWeight:
    w = effective_weight(param, transposed)
    if transposed:
        w = w.contiguous()  # a temporary: freed once quantized
    return quantize(w, scheme, name=name) if quantizer is None else quantizer(w)


def _rel_error(w: torch.Tensor, deq: torch.Tensor) -> float:
    w = w.float()
    err = float((w - deq.to(w.device)).norm())
    denom = float(w.norm())
    return err / denom if denom > 0 else err


def dequantize_kernel_weight(kw: KernelWeight) -> torch.Tensor:
    """fp32 [N, K] weight of a KernelWeight: the op applied to the identity (exact, no extra decoder)."""
    k = kw.in_features
    eye = torch.eye(k, dtype=torch.float32, device=next(t for t in kw.tensors if t is not None).device)
    return kw.op(eye, *kw.tensors, None, *kw.statics).t()
