"""QLoRA under FSDP2: ``fully_shard`` per block over a model with a quantized, frozen base.

>>> mesh = init_device_mesh("cpu", (world,))          # after init_process_group
>>> shard_qlora(model, mesh)                           # row layout + fully_shard per block + root
>>> opt = torch.optim.AdamW(lora_parameters(model))     # only the adapters train

Everything is PyTorch's own FSDP2 (per-parameter sharding over DTensor); this module only puts the
quantized state in a form FSDP2 shards correctly (:mod:`.layout`): codes and constants become
frozen parameters with whole rows / whole blocks along dim 0, so each rank stores ~1/world of the
quantized base and FSDP2 all-gathers a block's codes, constants, adapters and norms in one
collective (mixed dtypes travel as bytes) before its forward and again for its backward. Frozen
parameters get no gradient and no reduce-scatter; only the adapters' gradients are reduced.

Row counts that do not divide the world size are accepted: FSDP2 pads the last shards with whole
rows (a block is never split). Layers whose rows do not hold whole blocks raise `ShardingError`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .layout import to_row_layout


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: the elements of its largest ``nn.ModuleList`` (e.g. Llama's
    ``model.layers``), the usual FSDP wrapping unit."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of blocks found; pass blocks= explicitly")
    return list(max(lists, key=len))


def shard_qlora(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    blocks: Iterable[nn.Module] | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a QLoRA model with FSDP2 (in place): quantized layers to the row layout, then
    ``fully_shard`` on each block (default: :func:`transformer_blocks`) and on the root.

    mesh: a 1-D device mesh (default: all ranks of the default process group).
    mp_policy: FSDP2's mixed precision (e.g. bf16 adapters and activations); the quantized codes
        and fp32 constants are integer parameters and are never cast.
    Returns ``model`` (now an ``FSDPModule``).
    """
    to_row_layout(model)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks if blocks is not None else transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
