"""The row layout: a quantized linear whose codes and constants can be sharded by ``torch.distributed``.

`QuantizedLinear` keeps its kernel tensors as flat buffers; FSDP2, DTensor and
``torch.distributed.checkpoint`` shard *parameters* along a dimension. `ShardableQuantizedLinear`
holds the same bytes as frozen parameters shaped so that dimension 0 is a whole output row:

============== ============================== ==========================================
tensor          row-layout shape              one index of dim 0 holds
============== ============================== ==========================================
codes           [N, K/2] (int8: [N, K])       the packed codes of one output row
absmax / scale  [N, K/blocksize] ([N, G])     the constants of that row's blocks / groups
nested_codes    [N, K/blocksize]              the 8-bit codes of those constants
nested_absmax   [ceil(N*K/bs/nbs), 1]         one whole nested block (nbs constants)
nested_offset   [1]                           the one offset
code tables     buffers (16 / 256 entries)    replicated, never sharded
============== ============================== ==========================================

**The rule:** a layer can be sharded only if a row holds whole quantization blocks
(``in_features % blocksize == 0``; 4-bit codes also need an even ``in_features``), so that a shard
boundary on dim 0 never falls inside a block. Splitting along ``in_features`` (tensor-parallel
row-wise) further needs ``in_features / world`` to be a multiple of the block size
(:func:`check_column_split`).

The fp32 constants are stored as int32 parameters holding the same bits (``Tensor.view``): FSDP2's
mixed precision casts floating parameters only, so the constants reach the kernel bit-exact under
any ``MixedPrecisionPolicy``, and codes and constants of one block are all-gathered together.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..formats import Scheme
from ..kernels import KernelWeight, family_of
from ..passes.modules import apply_keeping_dtypes
from ..workflows.weight_only.linear import QuantizedLinear


class ShardingError(ValueError):
    """A layer cannot be sharded as asked; the message names the layer and the rule it breaks."""


_TABLES = ("table", "nested_table")  # shared code tables: replicated buffers


def row_shapes(kernel: str, name: str, n: int, k: int, statics: tuple[int, ...], layer: str) -> dict[str, tuple]:
    """Row-layout shape of each sharded kernel tensor of a ``kernel``-stem layer (code tables excluded).

    Raises `ShardingError` naming ``layer`` when a row would not hold whole blocks.
    """
    if kernel == "codebook":
        bs, nbs = statics[2], statics[3]
        if k % bs:
            raise ShardingError(
                f"{layer}: in_features={k} is not a multiple of the block size {bs}, so a row boundary would split a "
                f"quantization block (rule: shard on whole rows, each holding whole blocks); use a block size that "
                f"divides {k} or leave this layer unquantized"
            )
        blocks = n * k // bs
        return {"codes": (n, k // 2), "absmax": (n, k // bs), "nested_codes": (n, k // bs),
                "nested_absmax": (-(-blocks // nbs), 1), "nested_offset": (1,)}  # fmt: skip
    if kernel == "int4":
        if k % 2:
            raise ShardingError(
                f"{layer}: in_features={k} is odd, so two rows share a byte of packed 4-bit codes "
                "(rule: shard on whole rows); leave this layer unquantized or use int8"
            )
        groups = -(-k // statics[2])
        return {"codes": (n, k // 2), "scale": (n, groups), "zero_point": (n, groups)}
    if kernel == "int8":
        return {"codes": (n, k), "scale": (n,)}
    raise ShardingError(f"{layer}: {name} layers (kernel {kernel!r}) have no row layout; only nf4, fp4, int4, int8")


class ShardableQuantizedLinear(nn.Module):
    """A `QuantizedLinear` in the row layout (module docstring): same op, same bytes, frozen parameters.

    ``name`` (the layer's qualified name) appears in errors; :meth:`to_quantized` gives the
    flat-buffer module back.
    """

    def __init__(self, q: QuantizedLinear, name: str = "layer") -> None:
        super().__init__()
        if getattr(q, "input_scale", None) is not None:
            raise ShardingError(f"{name}: AWQ layers (an input multiply 1/s) cannot be sharded yet; quantize this "
                                "model with method 'rtn' or 'gptq' for FSDP/DDP/tensor parallel")  # fmt: skip
        self.in_features, self.out_features = q.in_features, q.out_features
        self.scheme: Scheme = q.scheme
        self.op = q.op
        self.statics = tuple(q.statics)
        # the resolved compute mode (and the option it came from) of the layer this one re-lays out
        self.compute, self.compute_option = q.compute, q.compute_option
        family = family_of(q.op)
        self.kernel = family.kernel
        self._all_names = tuple(t.name for t in family.weights)
        shapes = row_shapes(family.kernel, family.name, q.out_features, q.in_features, self.statics, name)
        self._float_bits: set[str] = set()
        self._flat: set[str] = set()  # passed to the op flat (the others keep their 2-D op shape)
        self._arg_names = tuple(q._arg_names)
        for arg in self._arg_names:
            if arg is None:
                continue
            t = getattr(q, arg)
            if arg in _TABLES:
                self.register_buffer(arg, t)
                continue
            if t.dim() == 1:
                self._flat.add(arg)
            t = t.reshape(shapes[arg])
            if t.dtype == torch.float32:
                self._float_bits.add(arg)
                t = t.view(torch.int32)
            self.register_parameter(arg, nn.Parameter(t, requires_grad=False))
        self.bias = q.bias
        self.qualified_name = name  # for error messages
        self.tp_forward = None  # set by the tensor-parallel styles: (self, x) -> DTensor

    def kernel_tensors(self) -> list[torch.Tensor | None]:
        """The op's tensor arguments: flat, fp32 constants viewed back as fp32 (no copy)."""
        out = []
        for arg in self._arg_names:
            if arg is None:
                out.append(None)
                continue
            t = getattr(self, arg)
            if isinstance(t, DTensor):  # only under tensor parallel; FSDP unshards
                t = t.to_local()
            t = t.view(torch.float32) if arg in self._float_bits else t
            out.append(t.reshape(-1) if arg in self._flat else t)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_forward is not None:
            return self.tp_forward(self, x)
        return self.op(x, *self.kernel_tensors(), self.bias, *self.statics, self.compute)

    def quantized_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, parameter) of the sharded quantized state (code tables excluded)."""
        for arg in self._arg_names:
            if arg is not None and arg not in _TABLES:
                yield arg, getattr(self, arg)

    def to_quantized(self) -> QuantizedLinear:
        """The flat-buffer `QuantizedLinear` holding the same bytes (needs the full, unsharded tensors)."""
        by_name = dict(zip((a for a in self._arg_names if a is not None),
                           (t for t in self.kernel_tensors() if t is not None), strict=True))  # fmt: skip
        tensors = tuple(by_name.get(n) for n in self._all_names)
        kw = KernelWeight(self.op, tensors, self.statics, self._all_names)
        return QuantizedLinear(kw, self.bias, self.scheme, self.compute_option)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        # .half() / .to(dtype) must leave the fp32 code tables alone (the quantized parameters are integers)
        return apply_keeping_dtypes(self, super()._apply, fn, recurse, tuple(self._buffers))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.scheme.name}, layout=rows")  # fmt: skip


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def to_row_layout(model: nn.Module) -> list[str]:
    """Replace every `QuantizedLinear` of ``model`` (LoRA bases included) by a `ShardableQuantizedLinear`
    holding the same bytes (in place; before ``fully_shard`` / ``parallelize_module``). Returns the names.

    Raises `ShardingError` (naming the layer) for a layer whose rows do not hold whole blocks; nothing
    is changed then.
    """
    found = [(n, m) for n, m in model.named_modules() if type(m) is QuantizedLinear]
    converted = [(n, ShardableQuantizedLinear(m, n)) for n, m in found]  # all checked before any swap
    for n, m in converted:
        _swap(model, n, m)
    return [n for n, _ in converted]


def from_row_layout(model: nn.Module) -> list[str]:
    """Inverse of :func:`to_row_layout` (in place, on a model holding full tensors: unsharded or gathered)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, ShardableQuantizedLinear)]
    for n, m in found:
        _swap(model, n, m.to_quantized())
    return [n for n, _ in found]


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, ShardableQuantizedLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, ShardableQuantizedLinear):
            yield name, m


def local_nbytes(t: torch.Tensor) -> int:
    """Bytes this rank stores for ``t`` (its shard, for a DTensor)."""
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def quantized_nbytes(model: nn.Module) -> tuple[int, int]:
    """(bytes stored on this rank, bytes of the whole) of the quantized codes and constants of ``model``."""
    local = total = 0
    for _, layer in quantized_layers(model):
        for _, t in layer.quantized_tensors():
            local += local_nbytes(t)
            total += t.numel() * t.element_size()  # a DTensor's numel is the global one
    return local, total


def check_column_split(layer: ShardableQuantizedLinear, name: str, world: int) -> None:
    """`ShardingError` unless ``in_features`` splits into ``world`` parts of whole blocks/groups."""
    k = layer.in_features
    unit = {"codebook": layer.statics[2] if len(layer.statics) > 2 else 1,
            "int4": layer.statics[2] if len(layer.statics) > 2 else 2, "int8": 1}[layer.kernel]  # fmt: skip
    if layer.kernel == "int4":
        unit = max(unit, 2)
    if k % world or (k // world) % unit:
        raise ShardingError(
            f"{name}: in_features={k} does not split into {world} parts of whole blocks of {unit} "
            f"(rule: a row-wise split falls on block boundaries, so in_features / world must be a multiple of {unit})"
        )


def check_row_split(layer: ShardableQuantizedLinear, name: str, world: int) -> None:
    """`ShardingError` unless ``out_features`` splits evenly over ``world`` ranks."""
    if layer.out_features % world:
        raise ShardingError(
            f"{name}: out_features={layer.out_features} rows do not divide over {world} ranks "
            "(rule: a column-wise split gives each rank the same number of whole rows)"
        )
