"""Run a linalg-on-tensors module on the CPU with MLIR's ExecutionEngine (a reference executor).

The torch-mlir wheel ships the passes of its e2e "RefBackend" (``refback-*``) and MLIR's
ExecutionEngine but not the Python driver (``torch_mlir_e2e_test``), so this is a small driver of
our own: lower to LLVM, JIT, call ``main`` with numpy arrays. Returns go through a callback
because the calling-convention pass turns results into calls of
``refbackend_consume_func_return_<types>``.

Runs only inside the export worker subprocess (a JIT crash must not take down the caller).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

# Bufferize, make the calling convention ExecutionEngine-friendly, lower everything to LLVM.
_PIPELINE = (
    "func.func(linalg-generalize-named-ops)",
    "func.func(linalg-fuse-elementwise-ops)",
    "convert-shape-to-std",
    "func.func(refback-generalize-tensor-pad)",
    "func.func(refback-generalize-tensor-concat)",
    "func.func(tm-tensor-bufferize)",
    "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map}",
    "refback-mlprogram-bufferize",
    "func.func(buffer-deallocation-pipeline)",
    "inline",
    "refback-munge-calling-conventions",
    "func.func(tm-tensor-to-loops)",
    "func.func(refback-munge-memref-copy)",
    "func.func(convert-linalg-to-loops)",
    "func.func(lower-affine)",
    "convert-scf-to-cf",
    "func.func(refback-expand-ops-for-llvm)",
    "func.func(arith-expand)",
    "func.func(convert-math-to-llvm)",
    "convert-math-to-libm",
    "expand-strided-metadata",
    "finalize-memref-to-llvm",
    "lower-affine",
    "convert-bufferization-to-memref",
    "finalize-memref-to-llvm",
    "func.func(convert-arith-to-llvm)",
    "convert-vector-to-llvm",
    "convert-func-to-llvm",
    "convert-cf-to-llvm",
    "convert-complex-to-llvm",
    "reconcile-unrealized-casts",
)

_RETURN_PREFIX = "refbackend_consume_func_return_"
_MEMREF_DTYPES = {
    "mrf16": np.float16,
    "mrf32": np.float32,
    "mrf64": np.float64,
    "mri1": np.bool_,
    "mri8": np.int8,
    "mri32": np.int32,
    "mri64": np.int64,
}
_SCALAR_CTYPES = {"i1": ctypes.c_bool, "i8": ctypes.c_byte, "i64": ctypes.c_int64, "f32": ctypes.c_float,
                  "f64": ctypes.c_double}  # fmt: skip
_INPUT_DTYPES = (np.float16, np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64, np.bool_)


def execute(mlir_text: str, inputs: list[np.ndarray], func_name: str = "main") -> list[np.ndarray]:
    """Compile ``mlir_text`` (linalg-on-tensors) and call ``func_name(*inputs)``; returns its results."""
    # torch-mlir is optional (the "mlir" extra): imported when a module is executed
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.passmanager import PassManager
    from torch_mlir.runtime import UnrankedMemRefDescriptor, get_unranked_memref_descriptor, unranked_memref_to_numpy

    with ir.Context() as ctx:
        torch_d.register_dialect(ctx)
        module = ir.Module.parse(mlir_text)
        PassManager.parse("builtin.module(" + ",".join(_PIPELINE) + ")").run(module.operation)
        engine = ExecutionEngine(module)
        results: list[Any] = []
        keep_alive = []  # ctypes callbacks must outlive the engine's calls
        for op in module.body:
            if "sym_name" not in op.attributes:
                continue
            name = ir.StringAttr(op.attributes["sym_name"]).value
            if not name.startswith(_RETURN_PREFIX):
                continue
            kinds = name[len(_RETURN_PREFIX) :].split("_")
            argtypes = [_SCALAR_CTYPES[k] if k in _SCALAR_CTYPES else ctypes.POINTER(UnrankedMemRefDescriptor)
                        for k in kinds]  # fmt: skip

            def consume(*args: Any, kinds: list[str] = kinds) -> None:
                results[:] = [a if k in _SCALAR_CTYPES else unranked_memref_to_numpy(a, _MEMREF_DTYPES[k]).copy()
                              for a, k in zip(args, kinds, strict=True)]  # fmt: skip

            cb = ctypes.CFUNCTYPE(None, *argtypes)(consume)
            keep_alive.append(cb)
            engine.register_runtime(name, cb)
        args = []
        for a in inputs:
            a = np.ascontiguousarray(a)
            if a.dtype.type not in _INPUT_DTYPES:
                raise TypeError(f"reference executor: input dtype {a.dtype} is not supported")
            args.append(ctypes.pointer(ctypes.pointer(get_unranked_memref_descriptor(a))))
        engine.invoke(func_name, *args)
        return list(results)
