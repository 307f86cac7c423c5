"""Deployment of QAT layers: the quantized weight QAT trained for, and its kernel tensors.

``deployed_weight`` is THE definition of what a QAT layer deploys: the weight clipped by its learned
ratios, quantized by the ordinary format code. The fake-quant forward is that same function
dequantized, so prepare and convert agree bit for bit.

`DeployedLinear` entries back the no-grad graphs the QAT pass lowers: one per (parameter, scheme,
orientation), shared by every compile, re-quantized IN PLACE when the weight or its ratios change
(checked before every call), so a graph never runs on stale weights.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ...formats import QuantizedWeight, Scheme, quantize
from ...kernels import KernelWeight, prepare_weight
from ...passes.weight_stamp import WeightStamp, version_of, watch
from ..weight_only.linear import QuantizedLinear
from .fake_quant import clip_weight, fake_quantize_activation
from .state import LinearQAT


def deployed_weight(
    param: torch.Tensor, scheme: Scheme, state: LinearQAT | None = None, transposed: bool = False, name: str = "weight"
) -> QuantizedWeight:
    """The quantized form of a (QAT) linear weight: ``quantize(clip(W), scheme)``.

    ``transposed``: the parameter is stored ``[in, out]`` and the linear's weight is its transpose.
    """
    w = param.detach()
    if transposed:
        w = w.t().contiguous()
    ratio = None if state is None else state.weight_ratio
    min_ratio = 0.05 if state is None else state.config.min_ratio
    return quantize(clip_weight(w, scheme, ratio, min_ratio), scheme, name=name)


@dataclass(eq=False)
class DeployedLinear:
    """Kernel tensors of one deployed QAT weight and the versions of what they were made from.

    Same interface as the backend's ``weight_cache.QuantEntry`` (``name``, ``scheme``, ``kw``,
    ``is_stale(param)``, ``refresh(param)``, sizes), so the backend's per-call guard covers it.
    """

    name: str
    scheme: Scheme
    transposed: bool
    state: LinearQAT | None
    kw: KernelWeight
    storage_bits: int
    numel: int
    stamp: WeightStamp
    ratio_version: int
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def bits_per_param(self) -> float:
        return self.storage_bits / self.numel

    @property
    def nbytes(self) -> int:
        return (self.storage_bits + 7) // 8

    def _ratio_version(self) -> int:
        return version_of(None if self.state is None else self.state.weight_ratio)

    def is_stale(self, param: torch.Tensor, check: str = "sampled") -> bool:
        """The weight (see :mod:`qbackend.passes.weight_stamp`) or its learned ratios changed since quantizing."""
        return not self.stamp.matches(param, check) or self._ratio_version() != self.ratio_version

    def refresh(self, param: torch.Tensor, check: str | None = None) -> None:
        """Re-quantize into the existing tensors (compiled graphs hold them); ``check``: only if still
        stale by that check once the lock is held."""
        with self._lock:
            if check is not None and not self.is_stale(param, check):
                return
            stamp, ratio_version = WeightStamp(param, full=self.stamp._full is not None), self._ratio_version()
            kw = prepare_weight(deployed_weight(param, self.scheme, self.state, self.transposed, self.name))
            with torch.no_grad():
                for old, new in zip(self.kw.tensors, kw.tensors, strict=True):
                    if old is not None and new is not None and old is not new:
                        old.copy_(new)
            self.stamp, self.ratio_version = stamp, ratio_version


_entries: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> {(scheme, transposed): weakref(entry)}


def get_deployed(
    param: torch.Tensor, scheme: Scheme, state: LinearQAT | None, transposed: bool, name: str
) -> DeployedLinear:
    """The shared, up-to-date deployment entry of ``param`` (quantized now if none is alive)."""
    per_param = _entries.setdefault(param, {})
    ref = per_param.get((scheme, transposed))
    entry = ref() if ref is not None else None
    if entry is None:
        stamp = WeightStamp(param)  # before reading it: a concurrent write is seen on the next check
        ratio_version = version_of(None if state is None else state.weight_ratio)
        qw = deployed_weight(param, scheme, state, transposed, name)
        kw = prepare_weight(qw)
        entry = DeployedLinear(name, scheme, transposed, state, kw, qw.storage_bits(), qw.numel, stamp, ratio_version)
        per_param[(scheme, transposed)] = weakref.ref(entry)
        watch(param, entry)
    elif entry.is_stale(param):
        entry.refresh(param, "sampled")
    return entry


class QATQuantizedLinear(QuantizedLinear):
    """A deployed QAT layer whose input is also quantized (int8 per token, or static per tensor)."""

    def __init__(
        self,
        kw: KernelWeight,
        bias: torch.Tensor | None,
        scheme: Scheme,
        activations: str,
        act_scale: torch.Tensor | None = None,
        compute: str = "auto",
    ) -> None:
        super().__init__(kw, bias, scheme, compute)
        self.activations = activations
        if activations == "static":
            self.register_buffer("act_scale", act_scale.detach().float().reshape(()).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.act_scale if self.activations == "static" else None
        return super().forward(fake_quantize_activation(x, scale))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activations={self.activations}"
