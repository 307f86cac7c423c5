"""Tensor-parallel inference of quantized linears with DTensor's ``parallelize_module``.

>>> to_row_layout(model)                                   # after qbackend.quantize_(model, "nf4")
>>> parallelize_module(model, mesh, llama_tp_plan(model))   # or any plan using the two styles below

`QuantizedColwiseParallel` / `QuantizedRowwiseParallel` are torch's ``ColwiseParallel`` /
``RowwiseParallel`` (same input/output layouts, same collectives) extended to quantized layers in
the row layout; on ``nn.Linear`` they are exactly torch's styles.

* column-wise: codes, block constants and bias sharded along output rows (``Shard(0)``); each rank
  computes its slice of the outputs. Needs ``out_features % world == 0``.
* row-wise: codes and block constants sharded along input columns (``Shard(1)`` of the row
  layout) on block boundaries, per-row constants (int8 scale) replicated; each rank computes a
  partial sum, all-reduced, then the bias is added once. Needs ``in_features / world`` to be a
  multiple of the block (group) size.

Nested (double-quantized) constants run in blocks of 256 constants across rows, which a split need
not keep whole, so they are decoded to their fp32 values first (the kernel's own decode,
``table[code] * absmax2 + offset``): +24 bits per block of 64 (~0.4 bit/param), same weights.
The layer's scheme becomes the un-nested one (e.g. ``nf4-b64``), so a checkpoint of a TP model says
what it holds.

LoRA layers (`LoRALinear`, from ``add_lora``) under the same plan: the base is split as above and
the adapters consistently with it, as torch splits an ``nn.Linear``: column-wise, ``lora_A``
replicated and ``lora_B`` split along its output rows (each rank adds its slice of ``B A x``);
row-wise, ``lora_A`` split along its input columns and ``lora_B`` replicated (``B A_i x_i`` is a
partial sum; DTensor all-reduces it when it is added to the base's output: one all-reduce more per
row-wise layer than without adapters). The adapters stay trainable (DTensor parameters; their
gradients equal one process's). The base must be quantized and in the row layout.
A layer that cannot be split as asked raises `ShardingError` naming it and the rule.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ..formats import Scheme
from ..workflows.qat.lora import LoRALinear
from .layout import ShardableQuantizedLinear, ShardingError, check_column_split, check_row_split

_NESTED = ("nested_codes", "nested_absmax", "nested_offset", "nested_table")


def denested_scheme(scheme: Scheme) -> Scheme:
    """The scheme of a layer after :func:`denest`: the same format with plain fp32 block constants."""
    return dataclasses.replace(scheme, nested=False)


def denest(layer: ShardableQuantizedLinear) -> None:
    """Replace a codebook layer's nested constants by the fp32 block constants they decode to (in place)."""
    if layer.kernel != "codebook" or getattr(layer, "nested_codes", None) is None:
        return
    if isinstance(layer.nested_codes, DTensor):
        raise ShardingError(f"{layer.qualified_name}: already sharded; decode nested constants before sharding")
    t = dict(zip(layer._arg_names, layer.kernel_tensors(), strict=True))
    nbs = layer.statics[3]
    i = torch.arange(t["nested_codes"].numel(), device=t["nested_codes"].device)
    absmax = t["nested_table"][t["nested_codes"].long()] * t["nested_absmax"][i // nbs] + t["nested_offset"].reshape(())
    rows = layer.out_features
    names = list(layer._arg_names)
    for n in _NESTED:
        if n in layer._parameters:
            del layer._parameters[n]
        else:
            del layer._buffers[n]
        names[names.index(n)] = None
    names[layer._all_names.index("absmax")] = "absmax"
    layer._arg_names = tuple(names)
    layer._float_bits.add("absmax")
    layer._flat.add("absmax")
    layer.register_parameter("absmax", nn.Parameter(absmax.reshape(rows, -1).view(torch.int32), requires_grad=False))
    layer.scheme = denested_scheme(layer.scheme)


def _distribute(layer: ShardableQuantizedLinear, mesh: DeviceMesh, placements: dict[str, list]) -> None:
    for name, t in list(layer.quantized_tensors()):
        dt = distribute_tensor(t.detach(), mesh, placements.get(name, [Replicate()]))
        layer.register_parameter(name, nn.Parameter(dt, requires_grad=False))


def _local_statics(layer: ShardableQuantizedLinear, n: int, k: int) -> tuple[int, ...]:
    return (n, k, *layer.statics[2:])


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


def _colwise_forward(layer: ShardableQuantizedLinear, x: torch.Tensor, *, mesh: DeviceMesh,
                     statics: tuple[int, ...]) -> DTensor:  # fmt: skip
    # each rank's input gradient covers only its output rows: a partial sum (torch's default would
    # take it as already reduced, since x is replicated)
    x_local = x.to_local(grad_placements=[Partial()]) if isinstance(x, DTensor) else x
    y = layer.op(x_local, *layer.kernel_tensors(), _local(layer.bias), *statics, layer.compute)
    return DTensor.from_local(y, mesh, [Shard(-1)], run_check=False)


def _rowwise_forward(layer: ShardableQuantizedLinear, x: torch.Tensor, *, mesh: DeviceMesh,
                     statics: tuple[int, ...]) -> DTensor:  # fmt: skip
    # Row shards are whole quantization blocks (multiples of 32 along K), so "int8" compute's
    # activation blocks are the same as in the unsharded layer.
    partial_y = layer.op(_local(x), *layer.kernel_tensors(), None, *statics, layer.compute)
    y = DTensor.from_local(partial_y, mesh, [Partial()], run_check=False).redistribute(placements=[Replicate()])
    if layer.bias is not None:  # added once, after the reduction
        y = DTensor.from_local(y.to_local() + _local(layer.bias).to(y.dtype), mesh, [Replicate()], run_check=False)
    return y


def _shard_colwise(module: ShardableQuantizedLinear, mesh: DeviceMesh) -> None:
    world = mesh.size()
    check_row_split(module, module.qualified_name, world)
    denest(module)
    _distribute(module, mesh, {n: [Shard(0)] for n, _ in module.quantized_tensors()})
    if module.bias is not None:
        module.bias = nn.Parameter(distribute_tensor(module.bias.detach(), mesh, [Shard(0)]), requires_grad=False)
    statics = _local_statics(module, module.out_features // world, module.in_features)
    module.tp_forward = partial(_colwise_forward, mesh=mesh, statics=statics)


def _shard_rowwise(module: ShardableQuantizedLinear, mesh: DeviceMesh) -> None:
    world = mesh.size()
    check_column_split(module, module.qualified_name, world)
    denest(module)
    per_row = {"int8": ("scale",)}.get(module.kernel, ())
    placements = {n: [Replicate()] if n in per_row else [Shard(1)] for n, _ in module.quantized_tensors()}
    _distribute(module, mesh, placements)
    statics = _local_statics(module, module.out_features, module.in_features // world)
    module.tp_forward = partial(_rowwise_forward, mesh=mesh, statics=statics)


def _shard_param(module: nn.Module, name: str, mesh: DeviceMesh, placement) -> None:  # noqa: ANN001
    p = getattr(module, name)
    if p is not None:
        dt = distribute_tensor(p.detach(), mesh, [placement])
        module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


def _shard_lora(module: LoRALinear, mesh: DeviceMesh, colwise: bool) -> None:
    """Split a LoRA layer's base and adapters consistently (module docstring)."""
    if not isinstance(module.base, ShardableQuantizedLinear):
        raise ShardingError(
            f"LoRA layer over {type(module.base).__name__}: tensor parallel splits LoRA layers whose base is "
            "quantized and in the row layout (quantize_base(model), then to_row_layout(model))"
        )
    (_shard_colwise if colwise else _shard_rowwise)(module.base, mesh)
    _shard_param(module, "lora_A", mesh, Replicate() if colwise else Shard(1))
    _shard_param(module, "lora_B", mesh, Shard(0) if colwise else Replicate())


class QuantizedColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` for quantized layers in the row layout and LoRA layers too (module docstring)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, LoRALinear):
            _shard_lora(module, device_mesh, colwise=True)
        elif isinstance(module, ShardableQuantizedLinear):
            _shard_colwise(module, device_mesh)
        else:
            return super()._apply(module, device_mesh)
        return _wrap_io(self, module, device_mesh, (Replicate(),))


class QuantizedRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` for quantized layers in the row layout and LoRA layers too (module docstring)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, LoRALinear):
            _shard_lora(module, device_mesh, colwise=False)
        elif isinstance(module, ShardableQuantizedLinear):
            _shard_rowwise(module, device_mesh)
        else:
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)
        return _wrap_io(self, module, device_mesh, self.desired_input_layouts)


def _wrap_io(style, module: nn.Module, mesh: DeviceMesh, desired: tuple) -> nn.Module:
    """Torch's input/output conversion for the style (what ``distribute_module`` installs), no partitioning."""
    return distribute_module(
        module, mesh, None,
        partial(style._prepare_input_fn, style.input_layouts, desired),
        partial(style._prepare_output_fn, style.output_layouts, style.use_local_output),
    )  # fmt: skip


def llama_tp_plan(model: nn.Module) -> dict[str, ColwiseParallel | RowwiseParallel]:
    """The Megatron plan for Llama-style blocks: q/k/v and gate/up column-wise, o/down row-wise.

    Attention then runs on each rank's heads (``num_attention_heads`` and ``num_key_value_heads``
    must divide by the world size; transformers' Llama infers the local head count from the shapes).
    Embeddings, norms and ``lm_head`` stay replicated.
    """
    plan: dict[str, ColwiseParallel | RowwiseParallel] = {}
    for name, _ in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            plan[name] = QuantizedColwiseParallel()
        elif leaf in ("o_proj", "down_proj"):
            plan[name] = QuantizedRowwiseParallel()
    if not plan:
        raise ShardingError(f"{type(model).__name__}: no q/k/v/o or gate/up/down projections found for the Llama plan")
    return plan
