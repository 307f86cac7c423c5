"""Distributed test set-up: ``run_ranks`` starts N processes of ``dist_worker.py``, as torchrun would
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), and returns what each rank wrote.

The session fixture ``two_ranks`` runs the ``all`` scenario once per backend (one start-up cost for
every distributed test): gloo with every rank on the CPU, and NCCL with rank i on cuda:i, which
needs 2 GPUs (NCCL cannot put two ranks on one GPU) and is skipped otherwise, saying why.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import dist_worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BACKENDS = ("gloo", "nccl")


def backend_skip_reason(backend: str, world: int = 2) -> str | None:
    """Why ``backend`` cannot run ``world`` ranks on this machine (None: it can)."""
    if backend == "gloo":
        return None if dist.is_gloo_available() else "torch built without gloo"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dist.is_nccl_available() and gpus >= world:
        return None
    nccl = "with NCCL" if dist.is_nccl_available() else "without NCCL"
    return (f"NCCL tests need {world} GPUs, one per rank (NCCL cannot put two ranks on one GPU), and torch with "
            f"NCCL; here {gpus} GPU(s) visible, torch {nccl}")  # fmt: skip


def run_ranks(scenario: str, out: Path, world: int = 2, timeout: float = 300, env: dict | None = None,
              backend: str = "gloo", check: bool = True) -> list[dict]:  # fmt: skip
    """Run ``dist_worker.py SCENARIO OUT`` on ``world`` ranks; fail with each rank's output tail on error.

    check=False: return, per rank, its result (None when it wrote none) with ``"returncode"`` added.
    """
    port = str(_free_port())
    procs = []
    for rank in range(world):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "QB_DIST_BACKEND": backend}  # fmt: skip
        cmd = [sys.executable, str(HERE / "dist_worker.py"), scenario, str(out)]
        procs.append(subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs, failed = [], False
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            text, _ = p.communicate()
            text += f"\n[timed out after {timeout} s]"
        outputs.append(text)
        failed |= p.returncode != 0
    if not check:
        found = [out / f"result-{r}.pt" for r in range(world)]
        return [{**(torch.load(f, weights_only=False) if f.is_file() else {"result": None}), "returncode": p.returncode,
                 "output": o[-3000:]} for f, p, o in zip(found, procs, outputs, strict=True)]  # fmt: skip
    if failed:
        tails = "\n".join(f"--- rank {r} (rc {p.returncode}) ---\n{o[-3000:]}" for r, (p, o) in
                          enumerate(zip(procs, outputs, strict=True)))  # fmt: skip
        pytest.fail(f"distributed scenario {scenario!r} failed:\n{tails}")
    return [torch.load(out / f"result-{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture
def ranks():
    """:func:`run_ranks`, for tests that start their own scenario."""
    return run_ranks


@pytest.fixture(scope="session", params=BACKENDS)
def two_ranks(request, tmp_path_factory) -> tuple[Path, list[dict]]:
    """(output dir, per-rank results) of the ``all`` scenario on 2 ranks of the backend (gloo, nccl)."""
    from qbackend.distributed import save_checkpoint

    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp(f"dist-{request.param}")
    single = dist_worker.random_adapters(dist_worker.qlora_model(seed=3), seed=3)
    save_checkpoint(single, out / "ckpt-1rank")
    torch.save(dist_worker.logits(single), out / "ckpt-1rank-logits.pt")
    return out, run_ranks("all", out, backend=request.param)
