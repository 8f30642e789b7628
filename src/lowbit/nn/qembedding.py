"""QuantEmbedding: a token embedding whose table is stored in a lowbit weight format.

The table [vocab, hidden] is a QuantizedTensor of shape (N = vocab, K = hidden), stored like a Linear's weight
(every stored tensor is row-major by token), in any registered format: GGUF block types, IntSpec groups, FP8.
A lookup gathers the stored rows of the requested tokens and dequantizes only those: for T tokens it costs
T·K dequantized weights (plus the gather of T rows of bytes), never the whole table, so the resident size is
the packed size. A tied lm_head in the same format is a QuantLinear over the very same tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantizedTensor


class QuantEmbedding(nn.Module):
    """Drop-in for torch.nn.Embedding (lookups only: no max_norm, no sparse gradients).

    The packed tensors are non-persistent buffers (checkpoints store them through `quantized_tensor()`);
    `dtype` is the dtype lookups return, and follows the model's `.to(dtype)`, while the buffers keep theirs.
    """

    def __init__(self, qt: QuantizedTensor, padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qt.shape
        self.spec = qt.spec
        self.padding_idx = padding_idx
        self.dtype = dtype
        for key, t in qt.tensors().items():
            self.register_buffer(key, t, persistent=False)

    def quantized_tensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.spec, (self.num_embeddings, self.embedding_dim), **dict(self._buffers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.quantized_tensor().rows(ids.to(self.qweight.device))
        return rows.dequantize(torch.float32).to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_tensor().dequantize(dtype)

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def _apply(self, fn, recurse=True):
        # codes and scales keep their dtypes; a float cast only changes the dtype lookups return
        for key, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.spec.name}, dtype={self.dtype}"
