"""Quantized linear kernels behind ``torch.ops.qbackend.*``: the API the backend's passes use.

>>> kw = prepare_weight(quantize(w, Scheme("nf4", nested=True)))
>>> y = quantized_linear(x, kw, bias)          # == kw.op(x, *kw.tensors, bias, *kw.statics)

Supported weights (2-D [out_features, in_features]): NF4/FP4 with any block size, plain or nested
constants; int4 symmetric or affine with groups along K (per-channel axis 0 and per-tensor scales
become one group of K); int8 symmetric per output channel (or per tensor). Anything else raises
:class:`UnsupportedWeight`; the layer then stays float. Weights are frozen (no weight gradient);
gradients flow to the input and the bias.

Vocabulary (one name per format). A format's name is the same in the config, ``Scheme.format``,
the op family and the op: nf4, fp4, int4, int8 -> ``qbackend::nf4_linear``, ``fp4_linear``,
``int4_linear``, ``int8_linear`` (and ``<format>_linear_grad_input``); ops that also quantize the
activations are named after that scheme: ``w8a8_linear``, ``w8a8_outlier_linear``. Below the ops,
kernels are named by their *kernel stem*, the storage layout they decode, which formats may share:
``codebook`` (nf4 and fp4: a 16-entry code table times a block absmax), ``int4``, ``int8``,
``w8a8``; the Triton ``LAYOUT`` constexpr and the C++ ``enum Layout`` use the same words. Use
:func:`linear_op` to go from a format to its op; never spell an op name at a call site.

Layout of the package: :mod:`.spec` (how a family is described), :mod:`.families` (the
descriptions), :mod:`.reference` (the oracle), :mod:`.ops` (registration derived from the
descriptions), :mod:`.cpu` / :mod:`.cuda` (device kernels via ``torch.library.register_kernel``),
:mod:`.triton` (the GPU kernels, imported on first CUDA call), :mod:`.unprepare` (``prepare_weight``'s
inverse, for describing a layer as a format record).

Adding a format: one :class:`~qbackend.kernels.spec.OpFamily` in :mod:`.families` and its
``<kernel>_linear`` (+ ``_grad_input``) in :mod:`.reference`; the op, its fake, autograd and
validation follow, as does the conformance suite. Faster paths are functions of the same names in
:mod:`.cpu` / :mod:`.triton` (registered by name); the export decomposition is one entry per
kernel stem in :mod:`qbackend.export.decompositions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import QuantizedWeight, Scheme, code_table
from . import attention as attention  # registers torch.ops.qbackend.decode_attention
from . import cpu as cpu  # registers the "cpu" kernels
from . import cuda as cuda  # registers the "cuda" kernels (Triton resolved on first call)
from . import linear_group as linear_group  # registers torch.ops.qbackend.linear_group
from . import ops as ops  # registers torch.ops.qbackend.*
from .families import FAMILIES, OpFamily, by_op_name
from .spec import COMPUTE_MODES, DEFAULT_COMPUTE
from .unprepare import weight_from_kernel_tensors

__all__ = [
    "COMPUTE_MODES",
    "FAMILIES",
    "KernelWeight",
    "OpFamily",
    "UnsupportedWeight",
    "family_of",
    "linear_op",
    "prepare_weight",
    "quantized_linear",
    "supported",
    "weight_from_kernel_tensors",
]

def linear_op(fmt: str | Scheme) -> torch._ops.OpOverload:
    """The op computing a linear layer in ``fmt``: a Scheme (its ``format``) or a family name
    ("nf4", "fp4", "int4", "int8", "w8a8", "w8a8_outlier"), e.g. ``torch.ops.qbackend.nf4_linear.default``."""
    name = fmt.format if isinstance(fmt, Scheme) else fmt
    if not isinstance(name, str):
        raise TypeError(f"linear_op takes a Scheme or a format name; got {type(fmt).__name__}")
    if name not in FAMILIES:
        raise KeyError(f"no quantized linear op for format {name!r}; known: {', '.join(FAMILIES)}")
    return getattr(torch.ops.qbackend, FAMILIES[name].op_name).default


def family_of(op: torch._ops.OpOverload | str) -> OpFamily:
    """The family describing ``op`` (an OpOverload, or a name like ``nf4_linear``; grad-input ops too)."""
    name = op if isinstance(op, str) else op._opname
    return by_op_name(name)[0]




class UnsupportedWeight(ValueError):
    """No quantized op handles this weight; ``reason`` says why (for reports)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class KernelWeight:
    """What a lowered linear needs at run time: ``op(x, *tensors, bias, *statics[, compute])``.

    op: e.g. ``torch.ops.qbackend.nf4_linear.default`` (see :func:`linear_op`).
    tensors: the op's tensor arguments after ``x`` and before ``bias``, in order (some may be None).
    statics: the op's int arguments after ``bias``.
    names: one name per entry of ``tensors`` (for registering them as buffers; skip the None ones).
    compute: the op's ``compute`` argument (weight-only formats; see
        :data:`~qbackend.kernels.spec.COMPUTE_MODES`), None for ops without one.
    """

    op: torch._ops.OpOverload
    tensors: tuple[torch.Tensor | None, ...]
    statics: tuple[int, ...]
    names: tuple[str, ...]
    compute: str | None = None

    @property
    def scalars(self) -> tuple[int | str, ...]:
        """The op's arguments after ``bias``: the ints, then ``compute`` where the op takes one."""
        return self.statics if self.compute is None else (*self.statics, self.compute)

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
    op = FAMILIES[scheme.format].op_name
    if scheme.format in ("nf4", "fp4"):
        return True, f"{scheme.name}: {op}"
    if scheme.bits == 4:
        if scheme.granularity == "channel" and scheme.axis not in (0, -2):
            return False, (f"{scheme.name}: int4 per-channel scales along axis {scheme.axis} (input channels) are "
                           "not supported; use axis 0 or groups along K")  # fmt: skip
        return True, f"{scheme.name}: {op}"
    if not scheme.symmetric:
        return False, f"{scheme.name}: int8 affine (zero point) weights are not supported; use symmetric int8"
    if scheme.granularity == "block":
        return False, f"{scheme.name}: int8 with groups is not supported; use per-channel (axis 0) int8"
    if scheme.granularity == "channel" and scheme.axis not in (0, -2):
        return False, f"{scheme.name}: int8 per-channel scales must be along axis 0 (output channels)"
    return True, f"{scheme.name}: {op}"


def prepare_weight(
    qw: QuantizedWeight, device: torch.device | str | None = None, compute: str = DEFAULT_COMPUTE
) -> KernelWeight:
    """The op and arguments that compute a linear layer with weight ``qw`` (optionally moved to ``device``),
    with arithmetic ``compute`` (one of :data:`~qbackend.kernels.spec.COMPUTE_MODES`).

    The canonical storage layout is used as is. Exceptions, both exact (same dequantized values):
    per-channel/per-tensor int4 scales become ``[N, 1]`` groups of K; nested int4 group constants
    are decoded to fp32 (``int4_linear`` takes plain scales; +32 bits per group).
    """
    ok, reason = supported(qw.scheme)
    if not ok:
        raise UnsupportedWeight(reason)
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_MODES)}; got {compute!r:.40}")
    if len(qw.shape) != 2:
        raise UnsupportedWeight(f"{qw.scheme.name}: a linear weight must be 2-D [out, in]; got shape {qw.shape}")
    if device is not None:
        qw = qw.to(device)
    n, k = qw.shape
    s = qw.scheme
    dev = qw.device
    op = linear_op(s)
    names = tuple(t.name for t in FAMILIES[s.format].weights)
    if s.format in ("nf4", "fp4"):
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
        nbs = nest.blocksize if nest is not None else s.nested_blocksize
        return KernelWeight(op, tensors, (n, k, s.blocksize, nbs), names, compute)
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
        return KernelWeight(op, tensors, (n, k, groupsize), names, compute)
    scale = scale.reshape(-1).expand(n).contiguous()
    return KernelWeight(op, (qw.codes.reshape(-1), scale), (n, k), names, compute)


def quantized_linear(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` through the quantized op: ``kw.op(x, *kw.tensors, bias, *kw.scalars)``."""
    return kw.op(x, *kw.tensors, bias, *kw.scalars)
