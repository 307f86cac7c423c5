"""Distributed test set-up: ``run_ranks`` starts N processes of ``dist_worker.py`` on gloo (CPU), as
torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT), and returns what each rank wrote.

The session fixture ``two_ranks`` runs the ``all`` scenario once (one start-up cost for every
distributed test) after writing the 1-process checkpoint it loads on 2 ranks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import dist_worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, out: Path, world: int = 2, timeout: float = 300, env: dict | None = None) -> list[dict]:
    """Run ``dist_worker.py SCENARIO OUT`` on ``world`` ranks; fail with each rank's output tail on error."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                    "OMP_NUM_THREADS": "1"}  # fmt: skip
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
    if failed:
        tails = "\n".join(f"--- rank {r} (rc {p.returncode}) ---\n{o[-3000:]}" for r, (p, o) in
                          enumerate(zip(procs, outputs, strict=True)))  # fmt: skip
        pytest.fail(f"distributed scenario {scenario!r} failed:\n{tails}")
    return [torch.load(out / f"result-{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture
def ranks():
    """:func:`run_ranks`, for tests that start their own scenario."""
    return run_ranks


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """(output dir, per-rank results) of the ``all`` scenario on 2 ranks."""
    from qbackend.distributed import save_checkpoint
    from qbackend.qat import lora_parameters

    out = tmp_path_factory.mktemp("dist")
    single = dist_worker.qlora_model(seed=3)
    with torch.no_grad():
        for p in lora_parameters(single):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    save_checkpoint(single, out / "ckpt-1rank")
    torch.save(dist_worker.logits(single), out / "ckpt-1rank-logits.pt")
    return out, run_ranks("all", out)
