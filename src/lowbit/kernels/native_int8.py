"""native-int8 — lowbit's own CPU kernel (csrc/cpu_gemm.cpp) for 8-bit integer weights: per channel or groups
of a multiple of 32 dividing in_features, symmetric or with zero points, in_features a multiple of 32.

    resident: qweight int8 [N, K] — the storage tensor itself (row-major codes: nothing repacked),
              kscales float32 [N, G] — the group scales s,
              offsets float32 [N, G] — z · s, so that (q − z) · s = q · s − offset,
              scales / zeros — the storage tensors (small), kept so that `restore` is exact.

Few rows of activations (decode) run the native kernel (where the CPU has AVX-512 VNNI: activations rounded to
int8 in blocks of 32 and integer dot products, `lowbit::int8_gemm_q8`; elsewhere activations rounded to bfloat16,
float32 products and sums); many rows (prefill) dequantize once per call and run a dense matmul, as native-int4 does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import IntSpec, QuantizedTensor
from .native_int4 import NativeKernel


class NativeInt8Kernel(NativeKernel):
    name = "native-int8"

    def unsupported(self, spec, shape, device, act=None):
        n, k = shape
        if not isinstance(spec, IntSpec) or spec.bits != 8:
            return "needs 8-bit weights"
        if k % 32 or spec.group_size_for(k) % 32:
            return f"needs in_features and groups divisible by 32 (got {k}, {spec.group_size_for(k)})"
        return self.native_unsupported(device, act)

    def prepare(self, qt):
        return {"qweight": qt.qweight.contiguous(), **self.scale_tensors(qt, 0.0)}

    def restore(self, packed, spec, shape):
        return QuantizedTensor(spec, shape, packed["qweight"], packed["scales"], packed.get("zeros"))

    def rows(self, x2, packed, group):
        op = torch.ops.lowbit.int8_gemm_q8 if self.q8 else torch.ops.lowbit.int8_gemm
        return op(x2, packed["qweight"], packed["kscales"], packed["offsets"], group)

    def many_rows(self, x2, packed, group):
        w = self.dense(packed, (packed["qweight"].shape[0], x2.shape[1])).to(self.dense_dtype)
        return F.linear(x2.to(self.dense_dtype), w).float()

    @staticmethod
    def dense(packed, shape) -> torch.Tensor:
        """The weight dequantized, float32 [N, K]."""
        n, k = shape
        g = packed["kscales"].shape[1]
        q = packed["qweight"].reshape(n, g, k // g).float()
        return (q * packed["kscales"][..., None] - packed["offsets"][..., None]).reshape(n, k)
