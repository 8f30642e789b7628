"""What a kernel is: a way to hold a QuantizedTensor in memory and multiply activations by it.

A kernel turns the storage tensors into its own resident tensors once (`prepare`), runs the matmul from
them (`linear`), and can give back the exact storage tensors (`restore`) so that saving never needs a
second copy of the weight in memory.
"""

from __future__ import annotations

import torch

from ..formats import IntSpec, QuantizedTensor

# CPU kernels with a packed path for few rows of activations (decode) switch to a dense one (a dequantized tile
# of the weight at a time, then a dense matmul) from this many rows: the packed kernels re-read the packed
# weight every few rows, the dense path reads a dequantized copy once.
DENSE_FROM_ROWS = 16


class Kernel:
    name = "base"

    def unsupported(self, spec: IntSpec, shape: tuple[int, int], device: torch.device, act=None) -> str | None:
        """None if this kernel can run the format (with activations quantized as `act`, an ActSpec or None)
        on the device, else the reason it cannot."""
        raise NotImplementedError

    def prepare(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def restore(self, packed: dict[str, torch.Tensor], spec: IntSpec, shape: tuple[int, int]) -> QuantizedTensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, packed: dict[str, torch.Tensor], spec: IntSpec, shape: tuple[int, int],
               bias: torch.Tensor | None, act=None) -> torch.Tensor:
        raise NotImplementedError
