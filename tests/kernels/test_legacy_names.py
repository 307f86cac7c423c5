"""Checkpoints written before ops were named by format (``codebook4_linear``) still load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import qbackend
from qbackend.serialization import load, save


@pytest.mark.parametrize("preset", ["nf4", "fp4"])
def test_a_manifest_naming_codebook4_linear_loads_to_the_format_op(tmp_path, preset: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    qbackend.quantize_(model, {"preset": preset, "min_params": 0})
    path = save(model, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118  (safe_open has no __iter__)
        meta = st.metadata()
    manifest = json.loads(meta["qbackend"])
    assert manifest["layers"]["0"]["op"] == f"qbackend.{preset}_linear.default"
    manifest["layers"]["0"]["op"] = "qbackend.codebook4_linear.default"  # as older versions wrote it
    save_file(tensors, str(path), metadata={**meta, "qbackend": json.dumps(manifest)})

    loaded = load(path, lambda: nn.Sequential(nn.Linear(64, 32)))
    assert loaded[0].op is getattr(torch.ops.qbackend, f"{preset}_linear").default
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
