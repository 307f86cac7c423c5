"""Quantized number formats as plain tensor functions (no FX, no kernels)."""

from .bnb_interop import from_bnb, from_bnb_state_dict, to_bnb, to_bnb_state_dict
from .codebooks import code_table
from .layer_record import LayerRecord, RecordError
from .nested import NestedConstants, nest_constants
from .packing import pack_4bit, unpack_4bit
from .qweight import (
    FORMAT_VERSION,
    QWEIGHT_DICT_VERSION,
    TENSOR_KEYS,
    QuantizedWeight,
    QuantizedWeightModule,
    dequantize,
    quantize,
)
from .scheme import BNB_BLOCKSIZES, SCHEME_DICT_VERSION, SUPPORTED_DTYPES, FormatError, Scheme
from .text import short_repr

__all__ = [
    "short_repr",
    "BNB_BLOCKSIZES",
    "FORMAT_VERSION",
    "QWEIGHT_DICT_VERSION",
    "SCHEME_DICT_VERSION",
    "SUPPORTED_DTYPES",
    "TENSOR_KEYS",
    "FormatError",
    "LayerRecord",
    "NestedConstants",
    "QuantizedWeight",
    "QuantizedWeightModule",
    "RecordError",
    "Scheme",
    "code_table",
    "dequantize",
    "from_bnb",
    "from_bnb_state_dict",
    "nest_constants",
    "pack_4bit",
    "quantize",
    "to_bnb",
    "to_bnb_state_dict",
    "unpack_4bit",
]
