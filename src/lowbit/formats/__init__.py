"""How a quantized tensor is stored: the format protocol and registry (base), the quantized tensor container
(tensor), integer formats (intq), FP8 (fp8), GGUF block formats (gguf), bit packing, and how activations are
quantized (act)."""

from .base import FORMATS, Grid, IntegerView, WeightFormat, check_importance, register_format, round_to_grid, spec_from_dict
from .tensor import QuantizedTensor
from .intq import IntSpec, choose_qparams, dequantize_codes, quantize_codes, search_qparams
from .fp8 import FloatSpec, cast_fp8, quantize_fp8
from .gguf import GGUF_TYPES, GGUFSpec, fallback_type
from .packing import pack_bits, unpack_bits

__all__ = [
    "FORMATS", "Grid", "IntegerView", "WeightFormat", "check_importance", "register_format", "round_to_grid", "spec_from_dict", "QuantizedTensor",
    "IntSpec", "choose_qparams", "search_qparams", "quantize_codes", "dequantize_codes",
    "FloatSpec", "cast_fp8", "quantize_fp8",
    "GGUFSpec", "GGUF_TYPES", "fallback_type",
    "pack_bits", "unpack_bits",
]
