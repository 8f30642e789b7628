"""native-int8 — lowbit's own CPU kernel (csrc/cpu_gemm.cpp) for any format whose values are codes in
[−128, 127] on per-group affine grids (formats.base.IntegerView), groups of a multiple of 32 columns (or of 16,
see below), in_features
a multiple of 32: 8-bit integer weights (per channel or groups, symmetric or with zero points), 5- to 7-bit
integer weights, and the GGUF types Q5_0, Q5_1, Q5_K and Q8_0 (codes that fit 4 bits go to native-int4, except
2-3-bit codes where the CPU has AVX-512 VNNI: here they are kept at their width, at the same speed per call).

    resident: wq      int8 [N, K] — the codes, rows in blocks of four as native_int4's (to_row_blocks: the decode
                      loop streams one run of memory instead of four); codes of 5 to 7 bits (0 .. 2^b − 1, K a
                      multiple of 64) packed to b bits instead: uint8 [N, K/2 + (b − 4)·K/8], each row a step of
                      S = 32 + 8·(b − 4) bytes per chunk of 64 columns: the chunk's low nibbles in native_int4's
                      chunked layout, then b − 4 little-endian 64-bit masks, mask j holding bit 4 + j of each
                      column's code; codes of 2 or 3 bits (GGUF's Q2_K and Q3_K) likewise as uint8 [N, b·K/8],
                      steps of S = 8·b bytes, the masks alone, mask j holding bit j; the rows of packed codes in
                      blocks of four too, by steps of S (`pack_codes`; the decode loop on int8 activations unpacks
                      them in registers, the other paths 64 rows at a time into a buffer of the thread's,
                      csrc/cpu_gemm.cpp); other codes widened to a byte,
              kscales [N, G] — the group scales s (GGUF: the sub-block scales),
              offsets [N, G] — so that w = q · s − offset (integer formats: z · s); 16-bit where exact, as
                      native_int4 keeps them (resident_scales), and the k-quants' (Q2_K, Q3_K, Q5_K, Q6_K) as
                      their codes and super-block scales (kscales_super, offsets_super; native_int4 documents them),
              for `restore`, exact: an integer format's scales / zeros (its codes come back from wq); a GGUF
                      type's block fields other than the codes (see native_int4), packed again on restore.
GGUF's 16-column sub-blocks (Q2_K, Q3_K, Q6_K) run here where the CPU decodes on int8 activations (AVX-512 VNNI or
AVX2: their decode kernel is the int8-activation one only); elsewhere they run on the reference kernel.

Few rows of activations (decode) run the native kernel (where the CPU has AVX-512 VNNI or AVX2: activations
rounded to int8 in blocks of 32 and integer dot products, `lowbit::int8_gemm_q8`; elsewhere activations rounded to
bfloat16, float32 products and sums); many rows (prefill) dequantize a tile of rows at a time and run ATen's dense matmul on
it (`lowbit::int8_dense_linear`), as native-int4 does.
"""

from __future__ import annotations

import torch

from . import native
from .native_int4 import NativeKernel, from_row_blocks, pack_chunks, packed_width, to_row_blocks


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] (0 .. 2^bits − 1) -> uint8 [N, K/2 + (bits − 4)·K/8] (5-7 bits) or [N, bits·K/8] (2-3 bits)
    in the layout above."""
    n, k = codes.shape
    c = codes.to(torch.int64)
    low = 4 if bits > 4 else 0                                                  # the bit the first mask holds
    weights = (1 << torch.arange(64, dtype=torch.int64))                        # bit i <- column 64c + i
    planes = [((c.reshape(n, k // 64, 64) >> (low + j)) & 1) for j in range(bits - low)]
    masks = torch.stack([(p * weights).sum(-1) for p in planes], dim=2)         # [N, K/64, masks] int64
    chunks = masks.contiguous().view(torch.uint8).reshape(n, k // 64, -1)       # little-endian 8 bytes each
    if bits > 4:
        chunks = torch.cat([pack_chunks(c & 15).reshape(n, k // 64, 32), chunks], dim=2)
    return to_row_blocks(chunks.reshape(n, -1).contiguous(), step=chunks.shape[2])


def codes_of(wq: torch.Tensor, k: int) -> torch.Tensor:
    """The int8 codes [N, K] (row-major) of a kernel's wq, packed or not."""
    return torch.ops.lowbit.int8_unpack(wq, k) if wq.dtype == torch.uint8 else from_row_blocks(wq)


class NativeInt8Kernel(NativeKernel):
    name = "native-int8"

    def unsupported(self, spec, shape, device, act=None):
        n, k = shape
        # groups of 16 (GGUF's Q2_K, Q3_K, Q6_K sub-blocks): decode on int8 activations only (native.q8())
        reason = self.groups_unsupported(spec, k, -128, 127, sixteen=native.available() and native.q8())
        if reason:
            return reason
        if k % 32:
            return f"needs in_features divisible by 32 (got {k})"
        return self.native_unsupported(device, act)

    def prepare(self, qt):
        codes, tensors = self.scale_tensors(qt)
        _g, qmin, qmax = qt.spec.integer_groups(qt.shape[1])
        bits = packed_width(qmin, qmax, qt.shape[1])
        if bits:
            return {"wq": pack_codes(codes, bits), **tensors}
        return {"wq": to_row_blocks(codes.to(torch.int8)), **tensors}

    def restore(self, packed, spec, shape):
        return self.restore_from(packed, spec, shape, codes_of(packed["wq"], shape[1]))

    def rows(self, x2, packed, group):
        if group % 32 and not self.q8:   # groups of 16 without int8 activations: the dense path
            return self.many_rows(x2, packed, group)
        if self.q8:
            return torch.ops.lowbit.int8_gemm_q8(x2, packed["wq"], packed["kscales"], packed["offsets"], group,
                                                 *self.supers(packed))
        return torch.ops.lowbit.int8_gemm(x2, packed["wq"], packed["kscales"], packed["offsets"], group, -1,
                                          *self.supers(packed))

    def many_rows(self, x2, packed, group):
        return torch.ops.lowbit.int8_dense_linear(x2, packed["wq"], packed["kscales"], packed["offsets"], group,
                                                  self.dense_dtype, *self.supers(packed))
