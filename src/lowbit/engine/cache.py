"""Preallocated (static) KV caches: fixed-size tensors written in place, so decode steps keep one shape.

Layout of the 16/32-bit cache: for each layer, keys and values are [1, kv_heads, max_len, head_dim] in the
model's dtype; position p of the sequence lives at index p of dim 2. Entries past the current length hold stale
data and are never read (attention reads the first `visible` positions).

Quantized caches (`kv_bits=8` or `4`) store, per layer and for keys and values alike:
    codes   int8  [1, kv_heads, max_len, head_dim]        (8-bit: signed codes in [-127, 127])
            uint8 [1, kv_heads, max_len, head_dim / 2]    (4-bit: codes q + 8 in [1, 15]; element 2j in the low
                                                          nibble of byte j, 2j+1 in the high one)
    scales  float32 [1, kv_heads, max_len, head_dim / group_size]
symmetric per (head, position, group of group_size channels): x ≈ q · s with s = absmax / (2^(b−1) − 1). Each
token's keys and values are quantized once, when written; a read dequantizes the visible positions to the
model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LowbitError


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def quantize_kv(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes, scales) in the layout above."""
    g = x.float().unflatten(-1, (-1, group_size))
    scales = (g.abs().amax(-1) / _qmax(bits)).clamp_min(1e-12)
    q = torch.round(g / scales.unsqueeze(-1)).clamp_(-_qmax(bits), _qmax(bits)).flatten(-2).to(torch.int8)
    if bits == 4:
        u = (q + 8).to(torch.uint8)
        q = u[..., 0::2] | (u[..., 1::2] << 4)
    return q, scales


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                  dtype: torch.dtype) -> torch.Tensor:
    if bits == 4:
        q = torch.stack(((codes & 0xF), (codes >> 4)), dim=-1).flatten(-2).to(torch.int8) - 8
    else:
        q = codes
    g = q.float().unflatten(-1, (-1, group_size)) * scales.unsqueeze(-1)
    return g.flatten(-2).to(dtype)


class StaticKVCache(nn.Module):
    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kv_bits: int | None = None, group_size: int | None = None):
        super().__init__()
        if kv_bits not in (None, 4, 8):
            raise LowbitError(f"KV-cache bits must be 4 or 8 (or none for the model's dtype), got {kv_bits}")
        group_size = group_size or head_dim
        if kv_bits and (head_dim % group_size or group_size % 2):
            raise LowbitError(f"KV-cache group size {group_size} must be even and divide head_dim {head_dim}")
        self.layers, self.max_len, self.dtype = layers, max_len, dtype
        self.kv_bits, self.group_size = kv_bits, group_size
        shape = (1, kv_heads, max_len, head_dim)
        for i in range(layers):
            for kind in "kv":
                if kv_bits is None:
                    self.register_buffer(f"{kind}{i}", torch.zeros(shape, dtype=dtype, device=device),
                                         persistent=False)
                    continue
                width = head_dim // 2 if kv_bits == 4 else head_dim
                codes_dtype = torch.uint8 if kv_bits == 4 else torch.int8
                self.register_buffer(f"{kind}{i}", torch.zeros(*shape[:3], width, dtype=codes_dtype, device=device),
                                     persistent=False)
                self.register_buffer(f"{kind}{i}_scale", torch.zeros(*shape[:3], head_dim // group_size,
                                                                     device=device), persistent=False)

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v ([1, kv_heads, T, head_dim]) at positions pos ([T])."""
        for kind, x in (("k", k), ("v", v)):
            buf = getattr(self, f"{kind}{layer}")
            if self.kv_bits is None:
                buf.index_copy_(2, pos, x)
            else:
                codes, scales = quantize_kv(x, self.kv_bits, self.group_size)
                buf.index_copy_(2, pos, codes)
                getattr(self, f"{kind}{layer}_scale").index_copy_(2, pos, scales)

    def read(self, layer: int, n) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first n positions, [1, kv_heads, n, head_dim] in the model's dtype."""
        out = []
        for kind in "kv":
            buf = getattr(self, f"{kind}{layer}")[:, :, :n]
            if self.kv_bits is not None:
                buf = dequantize_kv(buf, getattr(self, f"{kind}{layer}_scale")[:, :, :n], self.kv_bits,
                                    self.group_size, self.dtype)
            out.append(buf)
        return out[0], out[1]

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """x as the cache will give it back (identity for a 16/32-bit cache)."""
        if self.kv_bits is None:
            return x
        return dequantize_kv(*quantize_kv(x, self.kv_bits, self.group_size), self.kv_bits, self.group_size,
                             x.dtype)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
