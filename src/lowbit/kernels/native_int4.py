"""lowbit's native kernels (csrc/cpu_gemm.cpp): NativeKernel, what they share, and native-int4, for integer
weights of 2 to 4 bits, any group size that is a multiple of 32 (64 and up: of 64) dividing in_features, per
channel, symmetric or with zero points, in_features a multiple of 64.

    resident: wpack   uint8 [N, K // 2] — each row in chunks of 64 columns: byte j of chunk c holds the code of
                      column 64c + j in its low nibble and of column 64c + 32 + j in its high nibble (one 32-byte
                      load gives two vectors of 32 consecutive columns; see the C++ source),
              kscales float32 [N, G] — the group scales s (two-level scales decoded once, here),
              offsets float32 [N, G] — z · s, so that (q − z) · s = q · s − offset,
              scales / zeros — the storage tensors (small), kept so that `restore` is exact.

Few rows of activations (decode) run the native kernel, no weight ever dequantized to memory: where the CPU
has AVX-512 VNNI, activations rounded to int8 in blocks of 64 columns and integer dot products (as llama.cpp
decodes; `lowbit::int4_gemm_q8`, documented in csrc/cpu_gemm_q8.inc), elsewhere activations rounded to
bfloat16 with float32 products and sums (`lowbit::int4_gemm`). Many rows (prefill) dequantize the weight a tile
of rows at a time into a small per-thread buffer and run ATen's dense matmul on it, in `native.dense_dtype()`
(bfloat16 where the CPU has native bfloat16 arithmetic, float32 elsewhere).
"""

from __future__ import annotations

import torch

from ..formats import IntSpec, QuantizedTensor
from . import native
from .base import DENSE_FROM_ROWS, Kernel


def pack_chunks(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (values 0..15, K % 64 == 0) -> wpack uint8 [N, K // 2] in the layout above."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // 64, 2, 32)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()


def unpack_chunks(wpack: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_chunks: uint8 codes [N, K]."""
    n, half = wpack.shape
    b = wpack.reshape(n, half // 32, 1, 32)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(n, half * 2)


class NativeKernel(Kernel):
    """What lowbit's native kernels share: where they run, their float32 scales and offsets, and the switch
    between the native kernel (few rows) and the dense path (many rows)."""

    q8 = False                       # decode on int8 activations (set in prepare: where the CPU has VNNI)
    dense_dtype = torch.float32      # the dense path's matmul dtype (set in prepare)

    def native_unsupported(self, device, act) -> str | None:
        if device.type != "cpu" or act is not None:
            return "runs weight-only on CPU only"
        reason = native.load()
        if reason:
            return reason
        if native.isa() == 0:
            return "this CPU has no AVX2: the portable path is slower than PyTorch's kernels"
        return None

    def scale_tensors(self, qt, implicit_zero: float) -> dict[str, torch.Tensor]:
        """kscales s and offsets z · s (float32 [N, G]), with the storage tensors kept for `restore`."""
        # decided here, outside any traced code: the CPU does not change while the process runs
        self.dense_dtype = native.dense_dtype()
        self.q8 = native.vnni()
        s = qt.spec.group_scales(qt.scales, qt.shape[1]).float()
        z = qt.zeros.float() if qt.zeros is not None else torch.full_like(s, implicit_zero)
        out = {"kscales": s.contiguous(), "offsets": (z * s).contiguous(), "scales": qt.scales}
        if qt.zeros is not None:
            out["zeros"] = qt.zeros
        return out

    def linear(self, x, packed, spec, shape, bias, act=None):
        n, k = shape
        x2 = x.reshape(-1, k)
        group = k // packed["kscales"].shape[1]
        y = self.rows(x2, packed, group) if x2.shape[0] < DENSE_FROM_ROWS else self.many_rows(x2, packed, group)
        y = y.to(x.dtype).reshape(*x.shape[:-1], n)
        return y if bias is None else y + bias

    def rows(self, x2, packed, group) -> torch.Tensor:
        raise NotImplementedError

    def many_rows(self, x2, packed, group) -> torch.Tensor:
        raise NotImplementedError


class NativeInt4Kernel(NativeKernel):
    name = "native-int4"

    def unsupported(self, spec, shape, device, act=None):
        n, k = shape
        if not isinstance(spec, IntSpec) or spec.bits > 4:
            return "needs weights of at most 4 bits"
        if k % 64:
            return f"needs in_features divisible by 64 (got {k})"
        g = spec.group_size_for(k)
        if g % 32 or (g > 32 and g % 64):
            return f"needs groups of 32 or a multiple of 64 (got {g})"
        return self.native_unsupported(device, act)

    def prepare(self, qt):
        return {"wpack": pack_chunks(qt.codes()), **self.scale_tensors(qt, float(qt.spec.implicit_zero))}

    def restore(self, packed, spec, shape):
        return QuantizedTensor.from_codes(unpack_chunks(packed["wpack"]), packed["scales"], packed.get("zeros"),
                                          spec)

    def rows(self, x2, packed, group):
        op = torch.ops.lowbit.int4_gemm_q8 if self.q8 else torch.ops.lowbit.int4_gemm
        return op(x2, packed["wpack"], packed["kscales"], packed["offsets"], group)

    def many_rows(self, x2, packed, group):
        return torch.ops.lowbit.int4_dense_linear(x2, packed["wpack"], packed["kscales"], packed["offsets"], group,
                                                  self.dense_dtype)

    @staticmethod
    def dense(packed, shape) -> torch.Tensor:
        """The weight dequantized, float32 [N, K]."""
        n, k = shape
        g = packed["kscales"].shape[1]
        q = unpack_chunks(packed["wpack"]).reshape(n, g, k // g).float()
        return (q * packed["kscales"][..., None] - packed["offsets"][..., None]).reshape(n, k)
