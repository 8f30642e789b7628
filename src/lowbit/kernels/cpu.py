"""PyTorch's packed low-bit matmuls for CPU (ATen ops), which are fast with bfloat16 activations only:
activations are cast to bfloat16 on the way in and back to their dtype on the way out.

cpu-int8 — `aten._weight_int8pack_mm`, symmetric 8-bit per output channel.
    resident: qweight int8 [N, K] (the storage tensor itself, shared unless misaligned), scales float16 [N, 1] (storage),
              kscales bfloat16 [N] (the kernel's copy of the scales).

cpu-int4 — `aten._weight_int4pack_mm_for_cpu`, 2-, 3- and 4-bit codes (all fit a nibble) with groups of 32/64/128/256 (per-channel runs as
    groups of the largest of those that divides K, every group carrying the row's scale). Needs N % 16 == 0.
    resident: wpack uint8 [N, K // 2] — the codes in ATen's blocked nibble order (from
              `_convert_weight_to_int4pack_for_cpu`, which interleaves rows and columns within tiles),
              scale_zeros bfloat16 [K // gk, N, 2] — per kernel group: scale s and offset (8 − z) · s, so that
              ATen's (q − 8) · s + offset equals lowbit's (q − z) · s,
              scales / zeros — the storage tensors (small), kept so that `restore` is exact.
    For 2- and 3-bit codes the nibbles hold q − z + 8 (always in [0, 15]) and the offset is 0: a bfloat16
    offset (8 − z) · s nearly cancelling (q − 8) · s would cost precision that such coarse grids cannot spare.
    `restore` inverts ATen's nibble order with a permutation found by probing the conversion itself
    (see `_int4pack_order`), so no second copy of the codes is kept.
    Few rows run ATen's kernel; many rows (prefill) dequantize the same layout a tile at a time in lowbit's native
    library (`lowbit::int4pack_dense_linear`, whose source documents the nibble order) where it is built.
"""

from __future__ import annotations

import functools
import math

import torch

from ..formats import IntSpec, QuantizedTensor
from . import native
from .base import DENSE_FROM_ROWS, Kernel

INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """ATen's packed kernels read with aligned vector loads and crash on tensors that start mid-line, such as
    tensors read from a safetensors file at an arbitrary offset: copy those into a fresh (64-byte aligned) one."""
    return t if t.data_ptr() % 64 == 0 and t.is_contiguous() else t.contiguous().clone()


def _matmul_2d(x, fn, n_out, bias):
    y = fn(x.reshape(-1, x.shape[-1]).to(torch.bfloat16)).to(x.dtype)
    y = y.reshape(*x.shape[:-1], n_out)
    return y if bias is None else y + bias


class CpuInt8Kernel(Kernel):
    name = "cpu-int8"

    def unsupported(self, spec, shape, device, act=None):
        if device.type != "cpu" or act is not None:
            return "runs weight-only on CPU only"
        if not isinstance(spec, IntSpec) or spec.bits != 8 or not spec.symmetric or spec.num_groups(shape[1]) != 1:
            return "needs symmetric 8-bit per-channel weights"
        return None

    def prepare(self, qt):
        return {"qweight": _aligned(qt.qweight), "scales": qt.scales, "kscales": qt.scales[:, 0].to(torch.bfloat16)}

    def restore(self, packed, spec, shape):
        return QuantizedTensor(spec, shape, packed["qweight"], packed["scales"], None)

    def linear(self, x, packed, spec, shape, bias, act=None):
        fn = lambda x2: torch.ops.aten._weight_int8pack_mm(x2, packed["qweight"], packed["kscales"])
        return _matmul_2d(x, fn, shape[0], bias)


def _kernel_group(spec, k: int) -> int | None:
    g = spec.group_size_for(k)
    fits = [gk for gk in INT4_KERNEL_GROUPS if g % gk == 0 and k % gk == 0]
    return max(fits) if fits else None


@functools.lru_cache(maxsize=64)
def _int4pack_order(n: int, k: int) -> torch.Tensor:
    """For ATen's CPU int4 packing of an [n, k] code matrix: index i of the packed nibble stream
    (byte-major, low nibble first) holds code number order[i] of the row-major input.

    Found by converting the input positions themselves, four bits of the index per conversion.
    """
    total = n * k
    idx = torch.arange(total, dtype=torch.int64)
    order = torch.zeros(total, dtype=torch.int64)
    for shift in range(0, max(4, math.ceil(math.log2(total))), 4):
        digit = ((idx >> shift) & 15).to(torch.int32).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)
        order |= _nibbles(packed).to(torch.int64) << shift
    if not torch.equal(torch.sort(order).values, idx):
        raise RuntimeError("ATen's int4 packing is not a permutation of nibbles in this PyTorch build")
    return order


@functools.lru_cache(maxsize=1)
def int4pack_block_rows() -> int:
    """The rows per block of ATen's CPU int4 packing in this process (PyTorch picks it by the CPU: 64 with AVX-512,
    32 with AVX2), read from the packing itself: in a 64-row matrix whose row r holds codes r // 16, the high
    nibble of the first byte is the code of row B / 2."""
    codes = (torch.arange(64, dtype=torch.int32) // 16)[:, None].expand(64, 64).contiguous()
    high = int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).flatten()[0]) >> 4
    return {2: 64, 1: 32, 0: 16}[high]


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)


class CpuInt4Kernel(Kernel):
    name = "cpu-int4"

    def unsupported(self, spec, shape, device, act=None):
        n, k = shape
        if device.type != "cpu" or act is not None:
            return "runs weight-only on CPU only"
        if not isinstance(spec, IntSpec) or spec.bits > 4:
            return "needs weights of at most 4 bits"
        if n % 16:
            return f"needs out_features divisible by 16 (got {n})"
        if _kernel_group(spec, k) is None:
            return f"needs groups of {'/'.join(map(str, INT4_KERNEL_GROUPS))} dividing in_features={k}"
        return None

    # Many rows (prefill) run lowbit's native dense path on this same layout where the native library is built
    # (ATen's own matmul for many rows is several times slower than a dense one); decided in prepare, outside
    # any traced code: bfloat16 where the CPU has native bfloat16 arithmetic, float32 elsewhere; and the rows per
    # block of ATen's packing, which depends on the CPU too.
    dense_dtype: torch.dtype | None = None
    block_rows = 64

    def prepare(self, qt):
        if native.available():
            self.dense_dtype = native.dense_dtype()
            self.block_rows = int4pack_block_rows()
        n, k = qt.shape
        gk = _kernel_group(qt.spec, k)
        codes = qt.codes()
        s = qt.spec.group_scales(qt.scales, k)   # two-level scales are decoded once, here
        z = qt.zeros.float() if qt.zeros is not None else torch.full_like(s, float(qt.spec.implicit_zero))
        if qt.spec.bits < 4:
            codes = codes + self._shift(qt.spec, qt.zeros, k)
            z = torch.full_like(s, 8.0)
        wpack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_aligned(codes), 1)
        rep = qt.spec.group_size_for(k) // gk
        s, offset = s.repeat_interleave(rep, dim=1), ((8.0 - z) * s).repeat_interleave(rep, dim=1)
        scale_zeros = torch.stack([s.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous()
        out = {"wpack": wpack, "scale_zeros": scale_zeros, "scales": qt.scales}
        if qt.zeros is not None:
            out["zeros"] = qt.zeros
        return out

    @staticmethod
    def _shift(spec, zeros, k: int) -> torch.Tensor:
        """8 − z per element ([N, K] or broadcastable), for moving sub-4-bit codes onto ATen's zero point 8."""
        if zeros is None:
            return torch.tensor(8 - spec.implicit_zero, dtype=torch.int32)
        return (8 - zeros.to(torch.int32)).repeat_interleave(spec.group_size_for(k), dim=1)

    def restore(self, packed, spec, shape):
        n, k = shape
        codes = torch.empty(n * k, dtype=torch.uint8)
        codes[_int4pack_order(n, k)] = _nibbles(packed["wpack"])
        codes = codes.reshape(n, k)
        if spec.bits < 4:
            codes = codes.to(torch.int32) - self._shift(spec, packed.get("zeros"), k)
        return QuantizedTensor.from_codes(codes, packed["scales"], packed.get("zeros"), spec)

    def linear(self, x, packed, spec, shape, bias, act=None):
        gk = packed["wpack"].shape[1] * 2 // packed["scale_zeros"].shape[0]
        if self.dense_dtype is not None and x.numel() >= DENSE_FROM_ROWS * shape[1]:
            y = torch.ops.lowbit.int4pack_dense_linear(x.reshape(-1, shape[1]), packed["wpack"],
                                                       packed["scale_zeros"], gk, self.dense_dtype,
                                                       self.block_rows)
            y = y.to(x.dtype).reshape(*x.shape[:-1], shape[0])
            return y if bias is None else y + bias
        fn = lambda x2: torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed["wpack"], gk, packed["scale_zeros"])
        return _matmul_2d(x, fn, shape[0], bias)
