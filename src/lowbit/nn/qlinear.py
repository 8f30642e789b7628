"""QuantLinear: a drop-in for torch.nn.Linear that holds a quantized weight and calls a kernel."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import IntSpec, QuantizedTensor
from ..kernels import select_kernel


class QuantLinear(nn.Module):
    """y = x Ŵᵀ + b, with Ŵ stored in a lowbit format and multiplied by the chosen kernel.

    The kernel's resident tensors are registered as non-persistent buffers (so `.to(device)` moves them);
    `quantized_tensor()` gives back the exact storage tensors for saving. Moving the model to another dtype
    never touches these buffers: scales and codes keep their dtypes (only `bias` follows the model).
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None, kernel: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.spec = qt.spec
        self.kernel = select_kernel(qt.spec, qt.shape, qt.qweight.device, kernel)
        for key, t in self.kernel.prepare(qt).items():
            self.register_buffer(key, t, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def _packed(self) -> dict[str, torch.Tensor]:
        return dict(self._buffers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear(x, self._packed, self.spec, (self.out_features, self.in_features), self.bias)

    def quantized_tensor(self) -> QuantizedTensor:
        return self.kernel.restore(self._packed, self.spec, (self.out_features, self.in_features))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_tensor().dequantize(dtype)

    @property
    def resident_bytes(self) -> int:
        ts = list(self._buffers.values()) + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def _apply(self, fn, recurse=True):
        # keep the buffers' dtypes: a model-wide .to(bfloat16) must not round float16 scales or cast codes
        for key, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.spec.name}, kernel={self.kernel.name}")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
