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

**The rule:** every quantized layer's rows (``out_features``) divide evenly over the ranks, so each
rank holds the same number of whole rows; otherwise `ShardingError` names the layer, its row count
and the world size before anything is changed. ``allow_uneven_rows=True`` accepts such layers:
FSDP2 then pads the last ranks' shards with whole rows (a block is still never split; the padding
costs memory and all-gather traffic). Layers whose rows do not hold whole blocks raise
`ShardingError` too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..workflows.weight_only.linear import QuantizedLinear
from .layout import ShardableQuantizedLinear, ShardingError, to_row_layout


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
    allow_uneven_rows: bool = False,
) -> nn.Module:
    """Shard a QLoRA model with FSDP2 (in place): quantized layers to the row layout, then
    ``fully_shard`` on each block (default: :func:`transformer_blocks`) and on the root.

    mesh: a 1-D device mesh (default: all ranks of the default process group).
    mp_policy: FSDP2's mixed precision (e.g. bf16 adapters and activations); the quantized codes
        and fp32 constants are integer parameters and are never cast.
    allow_uneven_rows: accept layers whose ``out_features`` do not divide by the world size (FSDP2
        pads with whole rows); by default they raise `ShardingError` (module docstring).
    Returns ``model`` (now an ``FSDPModule``).
    """
    if not allow_uneven_rows:
        check_rows_divide(model, mesh.size() if mesh is not None else dist.get_world_size())
    to_row_layout(model)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks if blocks is not None else transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def check_rows_divide(model: nn.Module, world: int) -> None:
    """`ShardingError` naming the first quantized layer of ``model`` whose rows do not divide over ``world`` ranks."""
    rows = [(n, m.out_features) for n, m in model.named_modules()
            if isinstance(m, (QuantizedLinear, ShardableQuantizedLinear))]  # fmt: skip
    uneven = [(n, r) for n, r in rows if r % world]
    if not uneven:
        return
    name, n_rows = uneven[0]
    common = math.gcd(*(r for _, r in rows))
    fits = [w for w in range(2, 65) if common % w == 0][:4]
    advice = (
        f"run on a world size that divides every layer's rows (e.g. {', '.join(map(str, fits))})"
        if fits
        else "no world size > 1 divides every layer's rows"
    )
    more = f"; {len(uneven)} layers like this" if len(uneven) > 1 else ""
    raise ShardingError(
        f"{name}: out_features={n_rows} rows do not divide over {world} ranks{more} (rule: FSDP2 gives every rank "
        f"the same number of whole rows); {advice}, or pass allow_uneven_rows=True to let FSDP2 pad the last "
        "shards with whole rows"
    )
