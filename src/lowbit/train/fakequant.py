"""Fake-quantized Linears for quantization-aware training, and the conversions to and from packed modules.

A `FakeQuantLinear` computes y = x Ŵᵀ + b with Ŵ the dequantized value of its trainable float weights under
its format (lowbit.algorithms.learned.LearnedLinear with trainable weights): rounding is differentiated with
the straight-through estimator, and each group's scale is learnable as in LSQ (Esser et al., 2020), here as a
factor in [0.5, 1] on the start scale (and, for asymmetric formats, on each end of the range). Ŵ equals, bit
for bit, what `quantized()` packs, so a converted model computes what the trained one did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.learned import LearnedLinear, check_trainable
from ..formats import QuantizedTensor
from ..nn import QuantLinear, set_submodule


class FakeQuantLinear(nn.Module):
    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None, learn_scales: bool = True):
        super().__init__()
        check_trainable(qt.spec)
        self.out_features, self.in_features = qt.shape
        self.q = LearnedLinear(qt.dequantize(torch.float32), qt, learn_range=learn_scales, train_weight=True)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.q.weight().to(x.dtype), b)

    def quantized(self) -> QuantizedTensor:
        return self.q.quantized()


def prepare(model: nn.Module, learn_scales: bool = True) -> list[str]:
    """Replace every QuantLinear holding an integer format by a FakeQuantLinear starting from its values;
    returns the names replaced."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for n in names:
        m = model.get_submodule(n)
        set_submodule(model, n, FakeQuantLinear(m.quantized_tensor(), m.bias, learn_scales))
    return names


def convert(model: nn.Module, kernel: str = "auto") -> None:
    """Replace every FakeQuantLinear by a QuantLinear holding its packed result."""
    for n in [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
        m = model.get_submodule(n)
        set_submodule(model, n, QuantLinear(m.quantized(), None if m.bias is None else m.bias.detach(), kernel=kernel))
