"""native-int8 — lowbit's own CPU kernel (csrc/cpu_gemm.cpp) for 8-bit integer weights: per channel or groups
of a multiple of 32 dividing in_features, symmetric or with zero points, in_features a multiple of 32.

    resident: qweight int8 [N, K] — the storage tensor itself (row-major codes: nothing repacked),
              kscales float32 [N, G] — the group scales s,
              offsets float32 [N, G] — z · s, so that (q − z) · s = q · s − offset,
              scales / zeros — the storage tensors (small), kept so that `restore` is exact.

Few rows of activations (decode) run the native kernel (activations rounded to bfloat16, float32 products and
sums); many rows (prefill) dequantize once per call and run a dense matmul, as native-int4 does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import IntSpec, QuantizedTensor
from . import native
from .base import Kernel
from .native_int4 import DENSE_FROM_ROWS


class NativeInt8Kernel(Kernel):
    name = "native-int8"

    def unsupported(self, spec, shape, device, act=None):
        n, k = shape
        if device.type != "cpu" or act is not None:
            return "runs weight-only on CPU only"
        if not isinstance(spec, IntSpec) or spec.bits != 8:
            return "needs 8-bit weights"
        if k % 32 or spec.group_size_for(k) % 32:
            return f"needs in_features and groups divisible by 32 (got {k}, {spec.group_size_for(k)})"
        reason = native.load()
        if reason:
            return reason
        if native.isa() == 0:
            return "this CPU has no AVX2: the portable path is slower than PyTorch's kernels"
        return None

    def prepare(self, qt):
        n, k = qt.shape
        self.dense_dtype = torch.bfloat16 if native.isa() == 3 else torch.float32
        s = qt.spec.group_scales(qt.scales, k).float()
        z = qt.zeros.float() if qt.zeros is not None else torch.zeros_like(s)
        out = {"qweight": qt.qweight.contiguous(), "kscales": s.contiguous(), "offsets": (z * s).contiguous(),
               "scales": qt.scales}
        if qt.zeros is not None:
            out["zeros"] = qt.zeros
        return out

    def restore(self, packed, spec, shape):
        return QuantizedTensor(spec, shape, packed["qweight"], packed["scales"], packed.get("zeros"))

    def linear(self, x, packed, spec, shape, bias, act=None):
        n, k = shape
        x2 = x.reshape(-1, k)
        if x2.shape[0] < DENSE_FROM_ROWS:
            group = k // packed["kscales"].shape[1]
            y = torch.ops.lowbit.int8_gemm(x2, packed["qweight"], packed["kscales"], packed["offsets"], group)
        else:
            y = F.linear(x2.to(self.dense_dtype), self.dense(packed, shape).to(self.dense_dtype)).float()
        y = y.to(x.dtype).reshape(*x.shape[:-1], n)
        return y if bias is None else y + bias

    @staticmethod
    def dense(packed, shape) -> torch.Tensor:
        """The weight dequantized, float32 [N, K]."""
        n, k = shape
        g = packed["kscales"].shape[1]
        q = packed["qweight"].reshape(n, g, k // g).float()
        return (q * packed["kscales"][..., None] - packed["offsets"][..., None]).reshape(n, k)
