"""How a quantized tensor is stored: specs, packing, and the quantized tensor container."""

from .fp8 import FloatSpec, cast_fp8, quantize_fp8
from .intq import (IntSpec, QuantizedTensor, choose_qparams, dequantize_codes, quantize_codes, spec_from_dict,
                   storage_layout, storage_nbytes)
from .packing import pack_bits, unpack_bits

__all__ = [
    "FloatSpec",
    "cast_fp8",
    "quantize_fp8",
    "spec_from_dict",
    "IntSpec",
    "QuantizedTensor",
    "choose_qparams",
    "quantize_codes",
    "dequantize_codes",
    "pack_bits",
    "unpack_bits",
    "storage_layout",
    "storage_nbytes",
]
