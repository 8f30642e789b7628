"""The triton-w4a16 GEMM kernels (tensor-core `tl.dot` tiles, BLOCK_M ≥ 16): Mode.DOT_PER_NIBBLE (one dot per
16-column nibble block) and Mode.DOT_UNPACKED / Mode.DOT_TRANSPOSED (one dot per 128-column chunk).

Arguments and constants as the GEMV kernels' (see gemv), plus BLOCK_M and DOT_F32 (multiply in float32:
Triton's interpreter multiplies bfloat16 tiles as raw bits). Triton pipelines these loops (num_stages).
"""

import triton
import triton.language as tl

from .dequant import (addend_pairs, chunk_f32, chunk_params, f16x2, f16x2_weights, group_scales, group_zeros,
                      nibble_f32, nibble_params, pair_groups)
from .tiles import program_tile, write_tile


@triton.jit
def dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a·b, in float32 with DOT_F32."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def dot_per_nibble_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr,
                          M, N, K, group_size, stride_xm, stride_ym, chunks_per_split,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_NIBS: tl.constexpr,
                          SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr,
                          ATOMIC: tl.constexpr, LAST: tl.constexpr, DOT_F32: tl.constexpr, DQ16: tl.constexpr,
                          G128: tl.constexpr, USE_ASM: tl.constexpr):
    """Nibble i of a chunk is the [16, BLOCK_N] weight block of input columns 16 i .. 16 i + 15:
    acc += x[:, 16 i : 16 i + 16] × Ŵ-block i, eight dots per chunk, Ŵ dequantized to x's dtype through float32
    (`nibble_f32`) or, with DQ16 (float16 x, groups of 64 or more), on float16 pairs (`f16x2_weights`)."""
    pid, pid_k, _, offs_m, m_mask, offs_n, n_mask, offs_r, _, c0, c1, w_ptrs = program_tile(
        w_ptr, M, N, K, chunks_per_split, BLOCK_M, BLOCK_N)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (c0 * 128 + offs_r)[None, :]
    for c in range(c0, c1):
        p = tl.load(w_ptrs, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
        if DQ16:
            g_lo, g_hi = pair_groups(c, group_size, GROUP_NIBS, G128)
            s_lo = group_scales(s_ptr, g_lo, N, offs_n, n_mask)
            s_hi = group_scales(s_ptr, g_hi, N, offs_n, n_mask)
            zz_lo = group_zeros(z_ptr, g_lo, N, offs_n, n_mask, SYMMETRIC)
            zz_hi = group_zeros(z_ptr, g_hi, N, offs_n, n_mask, SYMMETRIC)
            s_pair = f16x2(s_lo, s_hi)
            z_a, z_b = addend_pairs(zz_lo, zz_hi, 1024.0, 64.0, 1.0)
            w0, w1, w2, w3, w4, w5, w6, w7 = f16x2_weights(p, s_pair[None, :], z_a[None, :], z_b[None, :], USE_ASM)
            acc = tl.dot(tl.load(x_ptrs, mask=m_mask[:, None], other=0.0), w0, acc)
            acc = tl.dot(tl.load(x_ptrs + 16, mask=m_mask[:, None], other=0.0), w1, acc)
            acc = tl.dot(tl.load(x_ptrs + 32, mask=m_mask[:, None], other=0.0), w2, acc)
            acc = tl.dot(tl.load(x_ptrs + 48, mask=m_mask[:, None], other=0.0), w3, acc)
            acc = tl.dot(tl.load(x_ptrs + 64, mask=m_mask[:, None], other=0.0), w4, acc)
            acc = tl.dot(tl.load(x_ptrs + 80, mask=m_mask[:, None], other=0.0), w5, acc)
            acc = tl.dot(tl.load(x_ptrs + 96, mask=m_mask[:, None], other=0.0), w6, acc)
            acc = tl.dot(tl.load(x_ptrs + 112, mask=m_mask[:, None], other=0.0), w7, acc)
        else:
            p_hi = p >> 12  # nibbles 5..7 are read from here (see dequant)
            for i in tl.static_range(8):
                if i % GROUP_NIBS == 0:
                    s, z = nibble_params(s_ptr, z_ptr, c, i, group_size, N, offs_n, n_mask, SYMMETRIC)
                q, inv16j = nibble_f32(p, p_hi, z, i)
                w = (q * (s * inv16j)[None, :]).to(x_ptr.dtype.element_ty)
                acc = dot(tl.load(x_ptrs + 16 * i, mask=m_mask[:, None], other=0.0), w, acc, DOT_F32)
        w_ptrs += 16 * N
        x_ptrs += 128
    write_tile(acc, pid, pid_k, offs_m, m_mask, offs_n, n_mask, b_ptr, y_ptr, p_ptr, cnt_ptr, M, N, stride_ym,
               HAS_BIAS, SPLIT_OUT, ATOMIC, LAST)


@triton.jit
def dot_chunk_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr,
                     M, N, K, group_size, stride_xm, stride_ym, chunks_per_split,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_NIBS: tl.constexpr,
                     SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr,
                     ATOMIC: tl.constexpr, LAST: tl.constexpr, DOT_F32: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The chunk's 8 nibbles unpacked into one [128, BLOCK_N] tile (`chunk_f32`) and one dot per chunk:
    acc += x-chunk × Ŵ, or with TRANSPOSED (Mode.DOT_TRANSPOSED) accᵀ += Ŵᵀ × x-chunkᵀ, so that the weight
    tile is the MMA's M side (its register operand) and the activations its N side."""
    pid, pid_k, _, offs_m, m_mask, offs_n, n_mask, _, offs_k, c0, c1, w_ptrs = program_tile(
        w_ptr, M, N, K, chunks_per_split, BLOCK_M, BLOCK_N)
    if TRANSPOSED:
        acc = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (c0 * 128 + offs_k)[:, None]
    else:
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (c0 * 128 + offs_k)[None, :]
    for c in range(c0, c1):
        p = tl.load(w_ptrs, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
        p_hi = p >> 12  # nibbles 5..7 are read from here (see dequant)
        s3, z3 = chunk_params(s_ptr, z_ptr, c, group_size, N, offs_n, n_mask, GROUP_NIBS, SYMMETRIC)
        w = chunk_f32(p, p_hi, s3, z3, x_ptr.dtype.element_ty)
        if TRANSPOSED:
            acc = dot(tl.trans(w), tl.load(x_ptrs, mask=m_mask[None, :], other=0.0), acc, DOT_F32)
        else:
            acc = dot(tl.load(x_ptrs, mask=m_mask[:, None], other=0.0), w, acc, DOT_F32)
        w_ptrs += 16 * N
        x_ptrs += 128
    if TRANSPOSED:
        acc = tl.trans(acc)
    write_tile(acc, pid, pid_k, offs_m, m_mask, offs_n, n_mask, b_ptr, y_ptr, p_ptr, cnt_ptr, M, N, stride_ym,
               HAS_BIAS, SPLIT_OUT, ATOMIC, LAST)
