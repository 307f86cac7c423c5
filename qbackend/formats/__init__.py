"""Quantized number formats as plain tensor functions (no FX, no kernels)."""

from .bnb_interop import from_bnb, from_bnb_state_dict, to_bnb, to_bnb_state_dict
from .codebooks import code_table
from .nested import NestedConstants, nest_constants
from .packing import pack_4bit, unpack_4bit
from .qweight import (
    FORMAT_VERSION,
    QuantizedWeight,
    QuantizedWeightModule,
    dequantize,
    load_safetensors,
    quantize,
    save_safetensors,
)
from .scheme import BNB_BLOCKSIZES, SUPPORTED_DTYPES, FormatError, Scheme

__all__ = [
    "BNB_BLOCKSIZES",
    "FORMAT_VERSION",
    "SUPPORTED_DTYPES",
    "FormatError",
    "NestedConstants",
    "QuantizedWeight",
    "QuantizedWeightModule",
    "Scheme",
    "code_table",
    "dequantize",
    "from_bnb",
    "from_bnb_state_dict",
    "load_safetensors",
    "nest_constants",
    "pack_4bit",
    "quantize",
    "save_safetensors",
    "to_bnb",
    "to_bnb_state_dict",
    "unpack_4bit",
]
