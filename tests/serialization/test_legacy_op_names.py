"""Checkpoints written before ops were named by format (format 1 named ``codebook4_linear``) still
load, onto today's format-named ops."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qbackend.serialization import load

FIXTURES = Path(__file__).parents[1] / "fixtures" / "checkpoints"


def _net():
    spec = importlib.util.spec_from_file_location("checkpoint_fixture_models", FIXTURES / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Net


@pytest.mark.parametrize(("fixture", "op"), [("nf4", "nf4_linear"), ("fp4_plain", "fp4_linear")])
def test_a_format1_checkpoint_naming_codebook4_linear_runs_the_format_op(fixture: str, op: str) -> None:
    path = FIXTURES / f"{fixture}.safetensors"
    with safe_open(str(path), "pt") as st:
        manifest = json.loads(st.metadata()["qbackend"])
    ops = {rec.get("op") for rec in manifest["layers"].values()}
    assert ops == {"qbackend.codebook4_linear.default"}  # written by the old code
    model = load(path, _net())
    layers = [m for m in model.modules() if hasattr(m, "op")]
    assert layers and all(m.op is getattr(torch.ops.qbackend, op).default for m in layers)
