"""triton-w4a16 — a Triton GEMM/GEMV for 4-bit integer weights and 16-bit activations on CUDA GPUs.

y[M, N] = x[M, K] · Ŵ[N, K]ᵀ (+ bias), with Ŵ = (q − z) · s dequantized tile by tile in registers (the full
dequantized weight is never written anywhere) and products accumulated in float32. Activations may be
float16, bfloat16 or float32 (the output has the activation dtype).

Parts: layout (the resident weight layout: `repack` / `unpack`), dequant (codes to floats in registers, shared
by every kernel), tiles (a program's tile and how its result reaches y, split-K), gemv (M = 1) and gemm
(tensor-core dots) kernels, config (the kernel variants, `Mode`, and the block sizes per shape,
`default_config`), launch (`w4a16_matmul`, `TritonW4A16Kernel`). Triton is optional: without it the package
imports and the kernel reports itself unsupported.
"""

from .config import Mode, default_config, split_for
from .launch import TritonW4A16Kernel, w4a16_matmul
from .layout import CHUNK, repack, unpack

__all__ = ["CHUNK", "Mode", "TritonW4A16Kernel", "default_config", "repack", "split_for", "unpack",
           "w4a16_matmul"]
