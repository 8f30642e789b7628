"""Attention of one decoded token over the KV cache on lowbit's native CPU kernel (csrc/decode_attention.cpp).

    q [1, H, 1, D], keys / values [1, G, T, D] (H % G == 0, unit stride along D: a slice of the cache)
    -> [1, H, 1, D] in q's dtype; arithmetic in float32 from the stored values, rounded once at the end.

The engine runs it for a decode step's attention on a CPU (engine.decoder, `attention`): over a bfloat16 cache
PyTorch's attention multiplies through MKL, whose bfloat16 GEMM runs its reference code on CPUs it does not optimize
for (AMD's), 7-15x this kernel's time at 100-2048 cached positions on an AMD EPYC Zen 4; over a float32 cache it
calls MKL's GEMV per head, 1.5-2x this kernel's time there. It is not PyTorch's arithmetic (that rounds the softmax
weights to bfloat16 before weighting the values of a bfloat16 cache, and sums in another order), so its outputs
agree with the model's own forward to the cache dtype's rounding, not bit for bit; `reference` computes the same in
float64, for tests.
"""

from __future__ import annotations

import torch

from . import native

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable(dtype: torch.dtype, device: torch.device) -> str | None:
    """None where the native kernel takes queries, keys and values of this dtype on this device, else why it
    does not."""
    if device.type != "cpu":
        return f"the kernel runs on CPUs, not {device.type}"
    if dtype not in DTYPES:
        return f"the kernel runs float32, bfloat16 or float16, not {dtype}"
    return native.load()


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.ops.lowbit.decode_attention(q, keys, values, scale)


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention in float64 (grouped queries expanded), for tests: [1, H, 1, D] float64."""
    rep = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(rep, dim=1)
    v = values.double().repeat_interleave(rep, dim=1)
    return ((q.double() @ k.transpose(-1, -2)) * scale).softmax(-1) @ v
