"""Checkpoints written by earlier qbackend versions keep loading to identical outputs.

The fixtures (tests/fixtures/checkpoints/, written by its ``make_fixtures.py`` with the code of commit
b48b5f2, checkpoint format 1) hold small seeded models in every stored format, with an input and the
eager output of the model that was saved. Loading runs eagerly (no compiler), so outputs are compared
bit for bit; the compiled check allows Inductor's float rounding.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import qbackend


def _fixtures_dir() -> Path:
    for parent in Path(__file__).resolve().parents:  # robust to this file moving within tests/
        d = parent / "fixtures" / "checkpoints"
        if d.is_dir():
            return d
    raise FileNotFoundError("tests/fixtures/checkpoints not found")


FIXTURES = _fixtures_dir()
CASES = sorted(p.stem for p in FIXTURES.glob("*.safetensors") if p.stem != "expected")


def _models():
    spec = importlib.util.spec_from_file_location("checkpoint_fixture_models", FIXTURES / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


models = _models()
# Copies: tensors read from a file may sit at any address, and BLAS rounds differently on unaligned rows.
EXPECTED = {k: t.clone() for k, t in load_file(str(FIXTURES / "expected.safetensors")).items()}


def _factory(name: str):
    return models.MLP if name.startswith("w8a8") else models.Net


def test_every_fixture_has_its_expected_output():
    assert set(CASES) == {"nf4", "fp4_plain", "int4", "int4_sym_nested", "int8", "w8a8", "w8a8_tensor_outliers",
                          "qat_nf4"}  # fmt: skip
    assert {k.rsplit(".", 1)[0] for k in EXPECTED} == set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_old_checkpoint_loads_to_identical_outputs(name, no_quantize):
    no_quantize()
    model = qbackend.load(FIXTURES / f"{name}.safetensors", _factory(name))
    with torch.no_grad():
        got = model(EXPECTED[f"{name}.x"])
    assert torch.equal(got, EXPECTED[f"{name}.y"])


@pytest.mark.parametrize("name", CASES)
def test_fixtures_are_format_1(name):
    with safe_open(str(FIXTURES / f"{name}.safetensors"), "pt") as st:
        manifest = json.loads(st.metadata()["qbackend"])
    assert manifest["format_version"] == 1
    assert all("op" in rec for rec in manifest["layers"].values())  # the old records name kernel ops


@pytest.mark.parametrize("name", ["nf4", "w8a8"])
def test_old_checkpoint_compiles(name):
    torch._dynamo.reset()
    model = qbackend.load(FIXTURES / f"{name}.safetensors", _factory(name))
    compiled = torch.compile(model)
    with torch.no_grad():
        got = compiled(EXPECTED[f"{name}.x"])
    # Inductor may fuse the float ops around the quantized ones differently (rounding only).
    torch.testing.assert_close(got, EXPECTED[f"{name}.y"], rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("name", CASES)
def test_old_checkpoint_resaves_in_the_current_format(tmp_path, name, no_quantize):
    no_quantize()
    model = qbackend.load(FIXTURES / f"{name}.safetensors", _factory(name))
    path = qbackend.save(model, tmp_path / f"{name}.safetensors")
    with safe_open(str(path), "pt") as st:
        manifest = json.loads(st.metadata()["qbackend"])
    assert manifest["format_version"] == qbackend.serialization.FORMAT_VERSION
    assert all("op" not in rec and "weight" in rec for rec in manifest["layers"].values())
    again = qbackend.load(path, _factory(name))
    with torch.no_grad():
        assert torch.equal(again(EXPECTED[f"{name}.x"]), EXPECTED[f"{name}.y"])


def test_old_checkpoint_config_is_text_only():
    with pytest.raises(qbackend.serialization.CheckpointError, match="format-1 checkpoint keeps only a text"):
        qbackend.serialization.load_config(FIXTURES / "nf4.safetensors")
