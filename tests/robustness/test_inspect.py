"""``qbackend inspect`` without matplotlib, and never a PNG in the working directory unless asked."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file

from qbackend.cli import inspect_command, main


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file({"fc.weight": torch.randn(256, 128), "fc.bias": torch.randn(256)}, path)
    return path


@pytest.fixture
def no_matplotlib(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        return None if name.split(".")[0] == "matplotlib" else real(name, *a, **k)

    monkeypatch.setattr(inspect_command.importlib.util, "find_spec", find_spec)


def test_json_works_without_matplotlib_and_writes_no_png(weights, tmp_path, monkeypatch, capsys, no_matplotlib):
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(weights), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plot"] is None and out["layers"][0]["name"] == "fc"
    assert list(tmp_path.glob("*.png")) == []


def test_the_table_writes_no_png_unless_asked(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(weights)]) == 0
    assert "fc" in capsys.readouterr().out and list(tmp_path.glob("*.png")) == []


def test_asking_for_a_plot_without_matplotlib_says_what_to_install(weights, capsys, no_matplotlib):
    assert main(["inspect", str(weights), "--plot", "x.png"]) == 2
    assert "--plot needs matplotlib, which is not installed: pip install matplotlib" in capsys.readouterr().err


def test_a_plot_under_json_needs_a_file_name(weights, capsys):
    assert main(["inspect", str(weights), "--json", "--plot"]) == 2
    assert "--plot with --json needs a FILE" in capsys.readouterr().err
