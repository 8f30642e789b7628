"""Round-to-nearest: each weight rounded to its nearest code independently, with the format's own scale choice
(min/max per group for integer formats; see each format's `quantize`)."""

import torch

from ..formats import QuantizedTensor, WeightFormat


def quantize_rtn(weight: torch.Tensor, spec: WeightFormat) -> QuantizedTensor:
    return spec.quantize(weight)


def fake_quantize(weight: torch.Tensor, spec: WeightFormat) -> torch.Tensor:
    """Quantize then dequantize (in float32): what the model will compute with, as a float tensor."""
    return spec.fake_quantize(weight)
