"""Quantization-aware training: fake-quantized Linears with a straight-through estimator and learnable scales
(`fakequant`), trained by distillation against the float model (`qat`), packed like a post-training result."""

from .fakequant import FakeQuantLinear, convert, prepare
from .qat import INITS, distillation_loss, generated_windows, qat

__all__ = ["FakeQuantLinear", "prepare", "convert", "qat", "distillation_loss", "generated_windows", "INITS"]
