"""``qbackend.export_mlir``: a quantized model as an MLIR module, through torch-mlir's FX importer.

Steps: quantize if needed (a shallow copy; the user's model is untouched) -> ``torch.export`` ->
replace ``torch.ops.qbackend.*`` by aten integer ops (:mod:`.decompositions`) -> torch-mlir import
and lowering IN A SUBPROCESS (torch-mlir can segfault on input it does not support; here that
becomes an `MLIRExportError`). Packed weights stay integer constants in the module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..serialization.source import quantized_module
from .decompositions import decomposition_table

OUTPUT_TYPES: tuple[str, ...] = ("linalg-on-tensors", "torch", "tosa", "stablehlo", "raw")


class MLIRExportError(RuntimeError):
    """The model could not be exported or lowered; the message says at which step and why."""


@dataclass(frozen=True)
class Constant:
    """A tensor constant of the module: its shape and MLIR element type (``i8``, ``ui8``, ``f32`` ...)."""

    shape: tuple[int, ...]
    element_type: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_integer(self) -> bool:
        return self.element_type.lstrip("su").startswith("i")


@dataclass(frozen=True)
class MLIRModule:
    """The exported module as MLIR text (``str(m)``), with the output type it was lowered to."""

    text: str
    output_type: str
    func_name: str = "main"

    def __str__(self) -> str:
        return self.text

    def save(self, path: str | os.PathLike) -> Path:
        """Write the MLIR text to ``path`` (via a temp file and rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(self.text)
        os.replace(tmp, path)
        return path

    def parse(self) -> Any:
        """The module parsed by torch-mlir's bindings (a ``torch_mlir.ir.Module``; raises on invalid text)."""
        _require_torch_mlir()
        from torch_mlir import ir
        from torch_mlir.dialects import torch as torch_d

        ctx = ir.Context()
        torch_d.register_dialect(ctx)
        if self.output_type == "stablehlo":  # not among the dialects a context loads by default
            from torch_mlir._mlir_libs import _stablehlo

            _stablehlo.register_dialect(ctx)
        with ctx:
            return ir.Module.parse(self.text)

    def constants(self) -> list[Constant]:
        """Every tensor literal of the module (weights, code tables, scales), with shape and element type."""
        out = []
        for m in _CONSTANT_RE.finditer(self.text):
            dims = m.group("dims")
            shape = tuple(int(d) for d in dims.split("x") if d) if dims else ()
            out.append(Constant(shape, m.group("etype")))
        return out

    def execute(self, *inputs: torch.Tensor, timeout: float = 600) -> list[torch.Tensor]:
        """Run a linalg-on-tensors module on the CPU with MLIR's ExecutionEngine (in a subprocess).

        A reference executor for checking an export, not a fast runtime.
        """
        if self.output_type != "linalg-on-tensors":
            raise MLIRExportError(f"execute() runs linalg-on-tensors modules; this one is {self.output_type!r}")
        with tempfile.TemporaryDirectory(prefix="qbackend-mlir-") as d:
            mlir = Path(d) / "module.mlir"
            mlir.write_text(self.text)
            torch.save([t.detach().cpu().contiguous() for t in inputs], Path(d) / "inputs.pt")
            job = {"kind": "execute", "mlir": str(mlir), "inputs": str(Path(d) / "inputs.pt"),
                   "func_name": self.func_name}  # fmt: skip
            out = _run_worker(job, Path(d), "executing the module with the reference backend", timeout)
            return torch.load(out)


# `dense_resource<blob> : tensor<32x16xi8>`, `dense<...> : tensor<16xf32>`, `torch.vtensor.literal(...) :
# !torch.vtensor<[32,16],ui8>`: the forms a literal takes in the four output types.
_CONSTANT_RE = re.compile(r"dense(?:_resource)?<[^>]*>\s*:\s*tensor<(?P<dims>(?:\d+x)*)(?P<etype>[a-z]+\d+)>")


def export_mlir(
    model: torch.nn.Module,
    *example_inputs: torch.Tensor,
    output_type: str = "linalg-on-tensors",
    dynamic_shapes: Any = None,
    func_name: str = "main",
    timeout: float = 600,
    **options: Any,
) -> MLIRModule:
    """Export ``model`` (quantized) to MLIR with torch-mlir.

    model: a module quantized with :func:`qbackend.quantize_`, a float module (quantized now with
        ``options``: QuantConfig fields or ``preset=``, else the defaults), or a ``torch.compile``d
        module (its qbackend options apply). The user's model is not modified.
    output_type: "linalg-on-tensors" (default), "torch", "tosa", "stablehlo" (or "raw": the import
        before any lowering).
    dynamic_shapes: passed to ``torch.export.export``.

    Packed 4-bit and int8 weights stay integer constants; decoding is explicit integer ops in the
    module; W8A8 layers are int8 x int8 -> int32 matmuls (SmoothQuant: folded norm parameters, and an
    elementwise multiply where the scales could not be folded). Needs the ``mlir`` extra (torch-mlir).
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
    _require_torch_mlir()
    # W8A8 with SmoothQuant traces the model once to fold its scales: on the inputs being exported.
    module, _ = quantized_module(model, options or None, tuple(example_inputs))
    program = _export_program(module, example_inputs, dynamic_shapes, output_type)
    with tempfile.TemporaryDirectory(prefix="qbackend-mlir-") as d:
        pt2 = Path(d) / "program.pt2"
        torch.export.save(program, pt2)
        job = {"kind": "lower", "program": str(pt2), "output_type": output_type, "func_name": func_name}
        out = _run_worker(job, Path(d), f"lowering to {output_type!r} with torch-mlir", timeout)
        return MLIRModule(out.read_text(), output_type, func_name)


def _export_program(module: torch.nn.Module, example_inputs: Sequence[Any], dynamic_shapes: Any, output_type: str):
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
            program = program.run_decompositions(decomposition_table(output_type))
    except Exception as e:
        raise MLIRExportError(f"torch.export could not trace the model: {type(e).__name__}: {e}") from e
    finally:
        module.train(was_training)
    left = sorted({str(n.target) for n in program.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("qbackend.")})  # fmt: skip
    if left:
        raise MLIRExportError(f"no aten decomposition for {', '.join(left)}; torch-mlir cannot lower custom ops")
    return program


def _run_worker(job: dict, workdir: Path, what: str, timeout: float) -> Path:
    """Run a job in ``python -m qbackend.export._worker``; return its output path or raise MLIRExportError."""
    job = {**job, "output": str(workdir / "output"), "error": str(workdir / "error.txt")}
    job_file = workdir / "job.json"
    job_file.write_text(json.dumps(job))
    try:
        proc = subprocess.run([sys.executable, "-m", "qbackend.export._worker", str(job_file)],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise MLIRExportError(f"{what} took longer than {timeout:.0f} s; stopped") from None
    if proc.returncode == 0:
        return Path(job["output"])
    err = Path(job["error"])
    if proc.returncode > 0 and err.exists():
        first, _, detail = err.read_text().partition("\n\n")
        raise MLIRExportError(f"{what} failed: {_shorten(first)}\n\n{detail.strip()}")
    sig = -proc.returncode
    name = signal.Signals(sig).name if 0 < sig < signal.NSIG else f"exit code {proc.returncode}"
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise MLIRExportError(
        f"torch-mlir crashed ({name}) while {what}. This is a torch-mlir bug on this graph; "
        f"try another output_type, or report the ops involved.\n{tail}"
    )


def _shorten(text: str, limit: int = 2000) -> str:
    text = "\n".join(line for line in text.splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ..."


def _require_torch_mlir() -> None:
    if importlib.util.find_spec("torch_mlir") is None:
        raise ImportError(
            "qbackend.export_mlir needs torch-mlir, which is not installed: "
            "pip install 'qbackend[mlir]' (or pip install torch-mlir)"
        )
