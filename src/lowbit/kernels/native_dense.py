"""A decode step's matmuls with 16-bit weights on lowbit's native CPU kernel (csrc/dense16.cpp).

    x [..., K] times weight [N, K] (+ bias [N]) -> [..., N], x, weight and bias in one dtype (bfloat16 or float16)
    and at most MAX_ROWS rows of x; float32 arithmetic from the stored values, rounded once.

The engine runs it for the unquantized Linears of a decoded token on a CPU (engine.decoder, `dense`): the lm_head
that the default recipe leaves in bfloat16 (57 MB, read whole every token), and every Linear of a bfloat16 model.
At one row PyTorch's bfloat16 matmul streamed that lm_head at 10.4 GB/s on an AMD EPYC Zen 4 whose memory reads
30 GB/s; this kernel at 29.9 GB/s (BENCHMARKS.md, "A decoded token's bfloat16 matmuls"). It is not PyTorch's
summation order, so results agree with the model's own forward to 16-bit rounding, not bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import native

DTYPES = (torch.bfloat16, torch.float16)
# Rows of activations up to which the kernel runs: it reads the weight once and multiplies every row from cache,
# so its time grows with the rows, where PyTorch's blocked GEMM hardly does. On the Zen 4, 576 -> 49152: 1 row
# 2.4 against 5.4 ms, 4 rows 4.0 against 6.0, 8 rows even, 16 rows twice PyTorch's time.
MAX_ROWS = 4


def unavailable(dtype: torch.dtype, device: torch.device) -> str | None:
    """None where the kernel takes weights of this dtype on this device, else why it does not."""
    if device.type != "cpu":
        return f"the kernel runs on CPUs, not {device.type}"
    if dtype not in DTYPES:
        return f"the kernel runs bfloat16 or float16 weights, not {dtype}"
    return native.load()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) on the kernel where x has at most MAX_ROWS rows, through PyTorch beyond."""
    rows = math.prod(x.shape[:-1])
    if rows > MAX_ROWS or weight.stride(-1) != 1:
        return F.linear(x, weight, bias)
    y = torch.ops.lowbit.dense16_linear(x.reshape(rows, x.shape[-1]), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in float64, for tests."""
    y = x.double() @ weight.double().t()
    return y if bias is None else y + bias.double()
