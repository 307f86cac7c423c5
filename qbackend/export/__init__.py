"""Exporting quantized models to other compilers (torch-mlir)."""

from .mlir import OUTPUT_TYPES, Constant, MLIRExportError, MLIRModule, export_mlir

__all__ = ["OUTPUT_TYPES", "Constant", "MLIRExportError", "MLIRModule", "export_mlir"]
