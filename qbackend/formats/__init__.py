"""Quantized number formats as plain tensor functions (no FX, no kernels)."""

from .codebooks import code_table
from .nested import NestedConstants, nest_constants
from .packing import pack_4bit, unpack_4bit
from .qweight import QuantizedWeight, dequantize, quantize
from .scheme import BNB_BLOCKSIZES, FormatError, Scheme

__all__ = [
    "BNB_BLOCKSIZES",
    "FormatError",
    "NestedConstants",
    "QuantizedWeight",
    "Scheme",
    "code_table",
    "dequantize",
    "nest_constants",
    "pack_4bit",
    "quantize",
    "unpack_4bit",
]
