"""Round-to-nearest: min/max scales per group, each weight rounded to its nearest code independently."""

import torch

from ..formats import IntSpec, QuantizedTensor, choose_qparams, quantize_codes


def quantize_rtn(weight: torch.Tensor, spec: IntSpec) -> QuantizedTensor:
    scales, zeros = choose_qparams(weight, spec)
    codes = quantize_codes(weight, scales, zeros, spec)
    return QuantizedTensor.from_codes(codes, scales, zeros, spec)


def fake_quantize(weight: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """Quantize then dequantize (in float32): what the model will compute with, as a float tensor."""
    return quantize_rtn(weight, spec).dequantize(torch.float32)
