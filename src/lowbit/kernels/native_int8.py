"""native-int8 — lowbit's own CPU kernel (csrc/cpu_gemm.cpp) for any format whose values are codes in
[−128, 127] on per-group affine grids (formats.base.IntegerView), groups of a multiple of 32 columns (or of 16,
see below), in_features
a multiple of 32: 8-bit integer weights (per channel or groups, symmetric or with zero points), 5- to 7-bit
integer weights, and the GGUF types Q5_0, Q5_1, Q5_K and Q8_0 (codes that fit 4 bits go to native-int4).

    resident: wq      int8 [N, K] — row-major codes; for 8-bit integer weights the storage tensor itself
                      (nothing repacked), for other formats their codes widened to a byte,
              kscales [N, G] — the group scales s (GGUF: the sub-block scales),
              offsets [N, G] — so that w = q · s − offset (integer formats: z · s); 16-bit where exact, as
                      native_int4 keeps them (resident_scales),
              for `restore`, exact: an integer format's scales / zeros (its codes come back from wq); a GGUF
                      type's block fields other than the codes (see native_int4), packed again on restore.
GGUF's 16-column sub-blocks (Q2_K, Q3_K, Q6_K) run here where the CPU has AVX-512 VNNI (their decode kernel is
the int8-activation one only); elsewhere they run on the reference kernel.

Few rows of activations (decode) run the native kernel (where the CPU has AVX-512 VNNI: activations rounded to
int8 in blocks of 32 and integer dot products, `lowbit::int8_gemm_q8`; elsewhere activations rounded to bfloat16,
float32 products and sums); many rows (prefill) dequantize once per call and run a dense matmul, as native-int4 does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native
from .native_int4 import NativeKernel, offsets_of


class NativeInt8Kernel(NativeKernel):
    name = "native-int8"

    def unsupported(self, spec, shape, device, act=None):
        n, k = shape
        # groups of 16 (GGUF's Q2_K, Q3_K, Q6_K sub-blocks): decode on int8 activations only (VNNI)
        reason = self.groups_unsupported(spec, k, -128, 127, sixteen=native.available() and native.vnni())
        if reason:
            return reason
        if k % 32:
            return f"needs in_features divisible by 32 (got {k})"
        return self.native_unsupported(device, act)

    def prepare(self, qt):
        codes, tensors = self.scale_tensors(qt)
        wq = codes.to(torch.int8)
        if qt.qweight.dtype == torch.int8 and torch.equal(qt.qweight, wq):   # stored as the kernel reads it
            wq = qt.qweight                                                    # (8-bit integers): no copy
        return {"wq": wq.contiguous(), **tensors}

    def restore(self, packed, spec, shape):
        return self.restore_from(packed, spec, shape, packed["wq"])

    def rows(self, x2, packed, group):
        if group % 32 and not self.q8:   # groups of 16 without int8 activations: the dense path
            return self.many_rows(x2, packed, group)
        op = torch.ops.lowbit.int8_gemm_q8 if self.q8 else torch.ops.lowbit.int8_gemm
        return op(x2, packed["wq"], packed["kscales"], packed["offsets"], group)

    def many_rows(self, x2, packed, group):
        w = self.dense(packed, (packed["wq"].shape[0], x2.shape[1])).to(self.dense_dtype)
        return F.linear(x2.to(self.dense_dtype), w).float()

    @staticmethod
    def dense(packed, shape) -> torch.Tensor:
        """The weight dequantized, float32 [N, K]."""
        n, k = shape
        g = packed["kscales"].shape[1]
        q = packed["wq"].reshape(n, g, k // g).float()
        return (q * packed["kscales"][..., None] - offsets_of(packed)[..., None]).reshape(n, k)
