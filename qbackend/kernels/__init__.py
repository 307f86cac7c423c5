"""Quantized linear kernels behind ``torch.ops.qbackend.*``: the API the backend's passes use.

>>> kw = prepare_weight(quantize(w, Scheme("nf4", nested=True)))
>>> y = quantized_linear(x, kw, bias)          # == kw.op(x, *kw.tensors, bias, *kw.statics)

Supported weights (2-D [out_features, in_features]): NF4/FP4 with any block size, plain or nested
constants; int4 symmetric or affine with groups along K (per-channel axis 0 and per-tensor scales
become one group of K); int8 symmetric per output channel (or per tensor). Anything else raises
:class:`UnsupportedWeight`; the layer then stays float. Weights are frozen (no weight gradient);
gradients flow to the input and the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import QuantizedWeight, Scheme, code_table
from . import ops  # noqa: F401  (registers torch.ops.qbackend.*)

__all__ = ["KernelWeight", "UnsupportedWeight", "prepare_weight", "quantized_linear", "supported"]


class UnsupportedWeight(ValueError):
    """No quantized op handles this weight; ``reason`` says why (for reports)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class KernelWeight:
    """What a lowered linear needs at run time: ``op(x, *tensors, bias, *statics)``.

    op: e.g. ``torch.ops.qbackend.codebook4_linear.default``.
    tensors: the op's tensor arguments after ``x`` and before ``bias``, in order (some may be None).
    statics: the op's int arguments after ``bias``.
    names: one name per entry of ``tensors`` (for registering them as buffers; skip the None ones).
    """

    op: torch._ops.OpOverload
    tensors: tuple[torch.Tensor | None, ...]
    statics: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def out_features(self) -> int:
        return self.statics[0]

    @property
    def in_features(self) -> int:
        return self.statics[1]

    def nbytes(self) -> int:
        """Bytes held by this weight's tensors (shared code tables included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors if t is not None)


def supported(scheme: Scheme) -> tuple[bool, str]:
    """Whether a weight in ``scheme`` can run as a quantized op: ``(ok, reason)``."""
    if scheme.kind in ("nf4", "fp4"):
        return True, f"{scheme.name}: codebook4_linear"
    if scheme.bits == 4:
        if scheme.granularity == "channel" and scheme.axis not in (0, -2):
            return False, (f"{scheme.name}: int4 per-channel scales along axis {scheme.axis} (input channels) are "
                           "not supported; use axis 0 or groups along K")  # fmt: skip
        return True, f"{scheme.name}: int4_linear"
    if not scheme.symmetric:
        return False, f"{scheme.name}: int8 affine (zero point) weights are not supported; use symmetric int8"
    if scheme.granularity == "block":
        return False, f"{scheme.name}: int8 with groups is not supported; use per-channel (axis 0) int8"
    if scheme.granularity == "channel" and scheme.axis not in (0, -2):
        return False, f"{scheme.name}: int8 per-channel scales must be along axis 0 (output channels)"
    return True, f"{scheme.name}: int8_linear"


def prepare_weight(qw: QuantizedWeight, device: torch.device | str | None = None) -> KernelWeight:
    """The op and arguments that compute a linear layer with weight ``qw`` (optionally moved to ``device``).

    The canonical storage layout is used as is. Exceptions, both exact (same dequantized values):
    per-channel/per-tensor int4 scales become ``[N, 1]`` groups of K; nested int4 group constants
    are decoded to fp32 (``int4_linear`` takes plain scales; +32 bits per group).
    """
    ok, reason = supported(qw.scheme)
    if not ok:
        raise UnsupportedWeight(reason)
    if len(qw.shape) != 2:
        raise UnsupportedWeight(f"{qw.scheme.name}: a linear weight must be 2-D [out, in]; got shape {qw.shape}")
    if device is not None:
        qw = qw.to(device)
    n, k = qw.shape
    s = qw.scheme
    dev = qw.device
    if s.kind in ("nf4", "fp4"):
        nest = qw.nested
        tensors = (
            qw.codes.reshape(-1),
            None if nest is not None else qw.scale.reshape(-1),
            None if nest is None else nest.codes.reshape(-1),
            None if nest is None else nest.absmax2.reshape(-1).float(),
            None if nest is None else nest.offset.reshape(1).float(),
            code_table(s.kind, dev),
            None if nest is None else code_table("dynamic", dev),
        )
        names = ("codes", "absmax", "nested_codes", "nested_absmax", "nested_offset", "table", "nested_table")
        nbs = nest.blocksize if nest is not None else s.nested_blocksize
        return KernelWeight(torch.ops.qbackend.codebook4_linear.default, tensors, (n, k, s.blocksize, nbs), names)
    scale = qw.block_constants().float()
    zp = qw.zero_point
    if s.bits == 4:
        if s.granularity == "block":
            groupsize = s.blocksize
            scale = scale.reshape(n, -(-k // groupsize))
        else:  # one group of K per row: per-channel (axis 0) or per-tensor, expanded to [N, 1]
            groupsize = k
            scale = scale.reshape(-1, 1).expand(n, 1).contiguous()
            zp = None if zp is None else zp.reshape(-1, 1).expand(n, 1).contiguous()
        tensors = (qw.codes.reshape(-1), scale.contiguous(), None if zp is None else zp.contiguous())
        return KernelWeight(torch.ops.qbackend.int4_linear.default, tensors, (n, k, groupsize),
                            ("codes", "scale", "zero_point"))  # fmt: skip
    scale = scale.reshape(-1).expand(n).contiguous()
    return KernelWeight(torch.ops.qbackend.int8_linear.default, (qw.codes.reshape(-1), scale), (n, k),
                        ("codes", "scale"))  # fmt: skip


def quantized_linear(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` through the quantized op: ``kw.op(x, *kw.tensors, bias, *kw.statics)``."""
    return kw.op(x, *kw.tensors, bias, *kw.statics)
