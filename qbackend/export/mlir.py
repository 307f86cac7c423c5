"""``qbackend.export_mlir``: a quantized model as an MLIR module, through torch-mlir's FX importer.

Steps: quantize if needed (a shallow copy; the user's model is untouched) -> ``torch.export`` ->
replace ``torch.ops.qbackend.*`` by aten integer ops (:mod:`.decompositions`) -> a check for what
torch-mlir cannot lower (data-dependent shapes) -> torch-mlir import and lowering IN A SUBPROCESS
with a memory limit (``RLIMIT_AS``) and a timeout (torch-mlir can segfault, or grow without bound,
on input it does not support; here that becomes an `MLIRExportError` and the caller is unaffected).
Packed weights stay integer constants in the module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
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
#: default time limit of one torch-mlir worker run (seconds)
DEFAULT_TIMEOUT = 600.0
GiB = 1 << 30


def default_memory_limit() -> int:
    """Default address-space limit of the torch-mlir worker: half the machine's memory, at least 4 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 16 * GiB
    return max(4 * GiB, total // 2)


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
class InputSpec:
    """One input of an exported module: its shape (None for a dynamic dimension) and dtype."""

    shape: tuple[int | None, ...]
    dtype: torch.dtype

    def accepts(self, t: torch.Tensor) -> bool:
        return t.dtype == self.dtype and t.dim() == len(self.shape) and all(
            d is None or d == s for d, s in zip(self.shape, t.shape, strict=True))  # fmt: skip

    def __str__(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{str(self.dtype).removeprefix('torch.')}[{dims}]"


@dataclass(frozen=True)
class MLIRModule:
    """The exported module as MLIR text (``str(m)``), with the output type it was lowered to and the
    inputs it was exported for (None: unknown, not checked)."""

    text: str
    output_type: str
    func_name: str = "main"
    inputs: tuple[InputSpec, ...] | None = None

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

    def execute(
        self, *inputs: torch.Tensor, timeout: float = DEFAULT_TIMEOUT, memory_limit: int | None = None
    ) -> list[torch.Tensor]:
        """Run a linalg-on-tensors module on the CPU with MLIR's ExecutionEngine (in a subprocess,
        bounded like the export: ``timeout`` seconds, ``memory_limit`` bytes).

        The inputs must match the exported signature (count, shapes, dtypes): a mismatch is a
        `ValueError`/`TypeError`, never a wrong result. A reference executor for checking an
        export, not a fast runtime.
        """
        if self.output_type != "linalg-on-tensors":
            raise MLIRExportError(f"execute() runs linalg-on-tensors modules; this one is {self.output_type!r}")
        self._check_inputs(inputs)
        with tempfile.TemporaryDirectory(prefix="qbackend-mlir-") as d:
            mlir = Path(d) / "module.mlir"
            mlir.write_text(self.text)
            torch.save([t.detach().cpu().contiguous() for t in inputs], Path(d) / "inputs.pt")
            job = {"kind": "execute", "mlir": str(mlir), "inputs": str(Path(d) / "inputs.pt"),
                   "func_name": self.func_name}  # fmt: skip
            out = _run_worker(job, Path(d), "executing the module with the reference backend", timeout, memory_limit)
            return torch.load(out)

    def _check_inputs(self, inputs: tuple[Any, ...]) -> None:
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"execute() takes tensors; input {i} is a {type(t).__name__}")
        if self.inputs is None:
            return
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the module takes {len(self.inputs)} input(s); got {len(inputs)}")
        for i, (t, spec) in enumerate(zip(inputs, self.inputs, strict=True)):
            if not spec.accepts(t):
                got = InputSpec(tuple(t.shape), t.dtype)
                exc = TypeError if t.dtype != spec.dtype else ValueError
                raise exc(f"input {i} is {got}; the module was exported for {spec}")


# `dense_resource<blob> : tensor<32x16xi8>`, `dense<...> : tensor<16xf32>`, `torch.vtensor.literal(...) :
# !torch.vtensor<[32,16],ui8>`: the forms a literal takes in the four output types.
_CONSTANT_RE = re.compile(r"dense(?:_resource)?<[^>]*>\s*:\s*tensor<(?P<dims>(?:\d+x)*)(?P<etype>[a-z]+\d+)>")


def export_mlir(
    model: torch.nn.Module,
    *example_inputs: torch.Tensor,
    output_type: str = "linalg-on-tensors",
    dynamic_shapes: Any = None,
    func_name: str = "main",
    timeout: float = DEFAULT_TIMEOUT,
    memory_limit: int | None = None,
    **options: Any,
) -> MLIRModule:
    """Export ``model`` (quantized) to MLIR with torch-mlir.

    model: a module quantized with :func:`qbackend.quantize_`, a float module (quantized now with
        ``options``: QuantConfig fields or ``preset=``, else the defaults), or a ``torch.compile``d
        module (its qbackend options apply). The user's model is not modified.
    output_type: "linalg-on-tensors" (default), "torch", "tosa", "stablehlo" (or "raw": the import
        before any lowering).
    dynamic_shapes: passed to ``torch.export.export``.
    timeout, memory_limit: bounds of the torch-mlir worker process: seconds, and bytes of address
        space (``RLIMIT_AS``; default :func:`default_memory_limit`). Hitting one is an
        `MLIRExportError` naming the limit and the graph's ops; the calling process is unaffected.

    Packed 4-bit and int8 weights stay integer constants; decoding is explicit integer ops in the
    module; W8A8 layers are int8 x int8 -> int32 matmuls (SmoothQuant: folded norm parameters, and an
    elementwise multiply where the scales could not be folded). Needs the ``mlir`` extra (torch-mlir).
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
    _require_torch_mlir()
    # W8A8 with SmoothQuant traces the model once to fold its scales: on the inputs being exported.
    _check_limits(timeout, memory_limit)
    module, _ = quantized_module(model, options or None, tuple(example_inputs))
    program = _export_program(module, example_inputs, dynamic_shapes, output_type)
    check_static_shapes(program)
    with tempfile.TemporaryDirectory(prefix="qbackend-mlir-") as d:
        pt2 = Path(d) / "program.pt2"
        torch.export.save(program, pt2)
        job = {"kind": "lower", "program": str(pt2), "output_type": output_type, "func_name": func_name}
        what = f"lowering to {output_type!r} with torch-mlir"
        out = _run_worker(job, Path(d), what, timeout, memory_limit, graph_ops(program))
        return MLIRModule(out.read_text(), output_type, func_name, input_specs(program))


def _check_limits(timeout: Any, memory_limit: Any) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0; got {type(timeout).__name__} {timeout!r:.40}")
    if memory_limit is not None and (
        isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 256 * (1 << 20)
    ):
        raise ValueError(f"memory_limit must be a number of bytes >= 256 MiB (e.g. 8 << 30) or None; "
                         f"got {type(memory_limit).__name__}")  # fmt: skip


def input_specs(program: Any) -> tuple[InputSpec, ...]:
    """The user inputs of an ExportedProgram as `InputSpec`s (symbolic dimensions -> None)."""
    from torch.export.graph_signature import InputKind

    user = {s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    out = []
    for node in program.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if node.name in user and isinstance(val, torch.Tensor):
            out.append(InputSpec(tuple(d if isinstance(d, int) else None for d in val.shape), val.dtype))
    return tuple(out)


def check_static_shapes(program: Any) -> None:
    """`MLIRExportError` if an op's output shape depends on the data (``nonzero``, boolean-mask
    indexing, ``unique``...): torch-mlir cannot lower those (it runs away instead), so say so now,
    naming the op and the module it comes from."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for node in program.graph.nodes:
        val = node.meta.get("val")
        vals = val if isinstance(val, (list, tuple)) else (val,)
        if any(isinstance(v, torch.Tensor) and free_unbacked_symbols(v.shape) for v in vals):
            raise MLIRExportError(
                f"{_where(node)} computes a tensor whose shape depends on its values ({node.target}); torch-mlir "
                "cannot lower data-dependent shapes. Keep that step outside the exported model (e.g. return a "
                "mask or use torch.where), then export"
            )


def _where(node: Any) -> str:
    """``module 'encoder.0' (line `return y[y > 0]`)``: where an exported node comes from."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    code = ""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    if lines:
        code = f" (line `{lines[-1].split('  #')[0].strip()[:80]}`)"
    return f"module {path!r}{code}" if path else f"the model{code}"


def graph_ops(program: Any, limit: int = 12) -> list[str]:
    """The distinct ops of an exported graph (for naming what torch-mlir was working on)."""
    ops = dict.fromkeys(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    return list(ops)[:limit]


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


def _run_worker(
    job: dict, workdir: Path, what: str, timeout: float, memory_limit: int | None = None, ops: list[str] | None = None
) -> Path:  # fmt: skip
    """Run a job in ``python -m qbackend.export._worker`` under the limits; return its output path or
    raise MLIRExportError."""
    limit = default_memory_limit() if memory_limit is None else memory_limit
    job = {**job, "output": str(workdir / "output"), "error": str(workdir / "error.txt")}
    job_file = workdir / "job.json"
    job_file.write_text(json.dumps(job))
    part = f" The graph's ops: {', '.join(ops)}." if ops else ""

    def bound() -> None:  # in the child, before exec: its address space, and no core dumps
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    proc, peak = _run_bounded([sys.executable, "-m", "qbackend.export._worker", str(job_file)], timeout, bound)
    if proc is None:
        raise MLIRExportError(
            f"{what} took longer than the time limit ({timeout:g} s; timeout=) and was stopped.{part} "
            "Split the model, or raise the limit if the graph is just large"
        )
    if proc.returncode == 0:
        return Path(job["output"])
    err = Path(job["error"])
    text = err.read_text() if err.exists() else ""
    said = (text + proc.stderr).lower()
    out_of_memory = peak >= 0.9 * limit or any(
        w in said for w in ("memoryerror", "bad_alloc", "out of memory", "cannot allocate memory"))  # fmt: skip
    if out_of_memory:
        raise MLIRExportError(
            f"{what} ran out of its memory limit ({limit / GiB:.1f} GiB of address space; memory_limit=) and was "
            f"stopped.{part}"
        )
    if proc.returncode > 0 and text:
        first, _, detail = text.partition("\n\n")
        raise MLIRExportError(f"{what} failed: {_shorten(first)}\n\n{detail.strip()}")
    sig = -proc.returncode
    name = signal.Signals(sig).name if 0 < sig < signal.NSIG else f"exit code {proc.returncode}"
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise MLIRExportError(
        f"torch-mlir crashed ({name}) while {what}. This is a torch-mlir bug on this graph (or the memory "
        f"limit of {limit / GiB:.1f} GiB was reached); try another output_type, or report the ops involved.{part}"
        f"\n{tail}"
    )


@dataclass
class _Finished:
    returncode: int
    stderr: str


def _run_bounded(cmd: list[str], timeout: float, preexec: Any) -> tuple[_Finished | None, int]:
    """Run ``cmd``; ``(result, peak address space in bytes)``, or ``(None, peak)`` after killing it at
    ``timeout``. The peak (``VmPeak``, polled) tells a memory-limit death from a crash."""
    import time

    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, preexec_fn=preexec)
        deadline = time.monotonic() + timeout
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _vm_peak(proc.pid))
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return None, peak
            time.sleep(0.05)
        err.seek(0)
        return _Finished(proc.returncode, err.read()[-20000:]), peak


def _vm_peak(pid: int) -> int:
    """A process's peak address space in bytes (0 if unknown: not Linux, or it just exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _shorten(text: str, limit: int = 2000) -> str:
    text = "\n".join(line for line in text.splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ..."


def _require_torch_mlir() -> None:
    if importlib.util.find_spec("torch_mlir") is None:
        raise ImportError(
            "qbackend.export_mlir needs torch-mlir, which is not installed: "
            "pip install 'qbackend[mlir]' (or pip install torch-mlir)"
        )
