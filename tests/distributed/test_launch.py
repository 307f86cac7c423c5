"""Which backend and device a rank gets (the CUDA/NCCL path, exercised here with faked GPU counts)."""

import pytest
import torch
import torch.distributed as dist
from conftest import backend_skip_reason

from qbackend.distributed.launch import pick_backend


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): pretend this machine has n CUDA devices and a torch built with NCCL."""

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(dist, "is_nccl_available", lambda: True)

    return fake


def test_auto_takes_nccl_with_one_gpu_per_rank(gpus):
    gpus(2)
    assert pick_backend("auto", local_rank=1, local_world=2) == ("nccl", torch.device("cuda", 1))
    assert pick_backend("gloo", local_rank=1, local_world=2) == ("gloo", torch.device("cpu"))


@pytest.mark.parametrize("n_gpus", [0, 1])
def test_auto_falls_back_to_gloo_on_the_cpu_without_a_gpu_per_rank(gpus, n_gpus):
    gpus(n_gpus)
    assert pick_backend("auto", local_rank=0, local_world=2) == ("gloo", torch.device("cpu"))


def test_nccl_with_two_ranks_on_one_gpu_is_refused(gpus):
    gpus(1)
    with pytest.raises(RuntimeError, match=r"nccl needs one GPU per rank: 2 rank\(s\) on this node but 1 GPU\(s\)"):
        pick_backend("nccl", local_rank=1, local_world=2)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend 'mpi' is not one of auto, gloo, nccl"):
        pick_backend("mpi")


def test_nccl_tests_skip_saying_why(gpus):
    gpus(1)
    reason = backend_skip_reason("nccl")
    assert "need 2 GPUs, one per rank" in reason and "1 GPU(s) visible" in reason
    gpus(2)
    assert backend_skip_reason("nccl") is None
    assert backend_skip_reason("gloo") is None
