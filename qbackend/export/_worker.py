"""Subprocess entry of the MLIR export: ``python -m qbackend.export._worker JOB.json``.

torch-mlir is native code that can abort or segfault on unsupported input (see
shared/notes/torch-compile.md); running it here turns that into an error in the caller, not a dead
interpreter. The job file says what to do; the result (or the error text) is written to the paths it names.

Jobs: ``lower`` (ExportedProgram .pt2 -> MLIR text) and ``execute`` (linalg MLIR text + inputs -> outputs).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def _lower(job: dict) -> None:
    # torch and torch-mlir load in this worker process only, so a crash in torch-mlir cannot take the caller down
    import torch
    from torch_mlir import fx

    program = torch.export.load(job["program"])
    module = fx.export_and_import(program, output_type=job["output_type"], func_name=job["func_name"])
    with open(job["output"], "w") as f:
        module.operation.print(file=f, large_elements_limit=None, enable_debug_info=False)


def _execute(job: dict) -> None:
    # as in _lower: the heavy imports happen in the worker process
    import torch

    from .refbackend import execute  # the worker imports only what its job needs (numpy, torch-mlir)

    text = Path(job["mlir"]).read_text()
    inputs = [t.numpy() for t in torch.load(job["inputs"])]
    outputs = execute(text, inputs, job["func_name"])
    torch.save([torch.from_numpy(o) for o in outputs], job["output"])


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        {"lower": _lower, "execute": _execute}[job["kind"]](job)
    except Exception as e:  # reported to the parent as text; the parent raises MLIRExportError
        msg = f"{type(e).__name__}: {e}".strip()
        Path(job["error"]).write_text(msg + "\n\n" + traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
