"""QLoRA under DDP on 2 CPU ranks against one process."""

import pytest
from torch import nn

from qbackend.distributed import replicate_qlora


def test_ddp_qlora_matches_single_process(two_ranks):
    _, results = two_ranks
    for res in results:
        rel = [abs(a - b) / abs(b) for a, b in zip(res["ddp_losses"], res["ref_losses"], strict=True)]
        assert len(rel) == 20 and max(rel) < 1e-5, rel


def test_replicate_qlora_refuses_a_model_without_adapters():
    with pytest.raises(ValueError, match="no trainable parameter"):
        replicate_qlora(nn.Linear(4, 4).requires_grad_(False))  # checked before DDP needs a process group
