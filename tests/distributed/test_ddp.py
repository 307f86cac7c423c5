"""QLoRA under DDP on 2 CPU ranks against one process."""

import math

import pytest
import torch
from dist_worker import logits, qlora_model
from torch import nn

from qbackend.distributed import load_checkpoint, replicate_qlora


def test_ddp_qlora_matches_single_process(two_ranks):
    _, results = two_ranks
    for res in results:
        rel = [abs(a - b) / abs(b) for a, b in zip(res["ddp_losses"], res["ref_losses"], strict=True)]
        assert len(rel) == 20 and max(rel) < 1e-5, rel


def test_ddp_checkpoint_loads_in_one_process(two_ranks):
    out, results = two_ranks
    model = qlora_model(seed=7)
    load_checkpoint(model, out / "ckpt-ddp")
    torch.testing.assert_close(logits(model), results[0]["ddp_logits"], rtol=1e-5, atol=1e-5)
    for res in results:  # training goes on after the save converted the layers in place
        assert len(res["ddp_losses_after_save"]) == 2 and all(math.isfinite(v) for v in res["ddp_losses_after_save"])


def test_replicate_qlora_refuses_a_model_without_adapters():
    with pytest.raises(ValueError, match="no trainable parameter"):
        replicate_qlora(nn.Linear(4, 4).requires_grad_(False))  # checked before DDP needs a process group
