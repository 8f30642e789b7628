"""A preallocated (static) KV cache: fixed-size tensors written in place, so decode steps keep one shape.

Layout: for each layer, keys and values are [1, kv_heads, max_len, head_dim] in the model's dtype; position p
of the sequence lives at index p of dim 2. Entries past the current length hold stale data and are masked out
by the attention mask.
"""

from __future__ import annotations

import torch
from torch import nn


class StaticKVCache(nn.Module):
    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__()
        shape = (1, kv_heads, max_len, head_dim)
        for i in range(layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.layers, self.max_len = layers, max_len

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v ([1, kv_heads, T, head_dim]) at positions pos ([T]); return the layer's whole cache."""
        kc, vc = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        return kc, vc

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
