"""Quantized models beyond one device, on ``torch.distributed`` only.

* :func:`shard_qlora`: QLoRA under FSDP2 (``fully_shard`` per block; the quantized base sharded).
* :mod:`.layout`: the row layout that makes quantized codes and constants shardable, and its rule.
"""

from .fsdp import shard_qlora, transformer_blocks
from .layout import (
    ShardableQuantizedLinear,
    ShardingError,
    from_row_layout,
    quantized_nbytes,
    to_row_layout,
)

__all__ = [
    "ShardableQuantizedLinear",
    "ShardingError",
    "from_row_layout",
    "quantized_nbytes",
    "shard_qlora",
    "to_row_layout",
    "transformer_blocks",
]
