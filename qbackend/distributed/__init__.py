"""Quantized models beyond one device, on ``torch.distributed`` only.

* :func:`shard_qlora`: QLoRA under FSDP2 (``fully_shard`` per block; the quantized base sharded).
* :func:`replicate_qlora`: QLoRA under DDP (the quantized base replicated, adapter gradients all-reduced).
* :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`consolidate`: ``torch.distributed.checkpoint``
  saves that reload on another world size, and into ``qbackend.load``.
* :class:`QuantizedColwiseParallel` / :class:`QuantizedRowwiseParallel` / :func:`llama_tp_plan`:
  tensor-parallel inference with ``parallelize_module``.
* :mod:`.layout`: the row layout that makes quantized codes and constants shardable, and its rule.
"""

from .checkpoint import (
    CheckpointLayoutError,
    CheckpointSaveError,
    consolidate,
    load_checkpoint,
    read_layout,
    save_checkpoint,
)
from .ddp import replicate_qlora
from .fsdp import shard_qlora, transformer_blocks
from .layout import (
    ShardableQuantizedLinear,
    ShardingError,
    from_row_layout,
    quantized_nbytes,
    to_row_layout,
)
from .tensor_parallel import QuantizedColwiseParallel, QuantizedRowwiseParallel, llama_tp_plan

__all__ = [
    "CheckpointLayoutError",
    "CheckpointSaveError",
    "QuantizedColwiseParallel",
    "QuantizedRowwiseParallel",
    "consolidate",
    "llama_tp_plan",
    "load_checkpoint",
    "read_layout",
    "replicate_qlora",
    "save_checkpoint",
    "ShardableQuantizedLinear",
    "ShardingError",
    "from_row_layout",
    "quantized_nbytes",
    "shard_qlora",
    "to_row_layout",
    "transformer_blocks",
]
