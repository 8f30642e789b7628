"""How a quantized tensor is stored: specs, packing, and the quantized tensor container."""

from .intq import (IntSpec, QuantizedTensor, choose_qparams, dequantize_codes, quantize_codes, storage_layout,
                   storage_nbytes)
from .packing import pack_bits, unpack_bits

__all__ = [
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
