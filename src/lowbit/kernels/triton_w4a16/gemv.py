"""The triton-w4a16 GEMV kernels (M = 1, Mode.GEMV_F32 and Mode.GEMV_F16X2): one row of x against a
[K, BLOCK_N] run of the weight, products in registers, one reduction over the 16 word rows at the end.

Arguments of both (and of the GEMM kernels): x, the resident weight (qweight, scales, zeros), bias, y, the
split-K partial sums and tile counters; M, N, K, the storage group size, the row strides of x and y, and the
number of K chunks per program. Constants: BLOCK_N, GROUP_NIBS (nibbles per group within a chunk, 8 for groups
of 128 columns or more), SYMMETRIC (no zeros: z = 8), HAS_BIAS, SPLIT_OUT / ATOMIC / LAST (split-K, see config).
"""

import triton
import triton.language as tl

from .dequant import (addend_pairs, f16x2_products, group_scales, group_zeros, load_f16x2, nibble_f32,
                      nibble_params, pair_groups)
from .tiles import program_tile, write_tile


@triton.jit
def gemv_f32_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr,
                    M, N, K, group_size, stride_xm, stride_ym, chunks_per_split,
                    BLOCK_N: tl.constexpr, GROUP_NIBS: tl.constexpr, SYMMETRIC: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr, ATOMIC: tl.constexpr, LAST: tl.constexpr,
                    PREFETCH: tl.constexpr):
    """Codes dequantized to float32 (`nibble_f32`), the factor 16^j taken out through x; a group's products are
    summed unscaled and multiplied by its scale once. PREFETCH: load the next chunk's codes while this one is
    used."""
    pid, pid_k, pid_m, _, _, offs_n, n_mask, offs_r, _, c0, c1, w_ptrs = program_tile(
        w_ptr, M, N, K, chunks_per_split, 1, BLOCK_N)
    acc = tl.full([16, BLOCK_N], 0.0, tl.float32)
    x_ptrs = x_ptr + pid_m * stride_xm + c0 * 128 + offs_r
    if PREFETCH:
        p_next = tl.load(w_ptrs, mask=n_mask[None, :] & (offs_r[:, None] < (c1 - c0) * 16), other=0)
    for c in range(c0, c1):
        if PREFETCH:
            p = p_next.to(tl.uint32, bitcast=True)
            p_next = tl.load(w_ptrs + 16 * N, mask=n_mask[None, :] & (offs_r[:, None] < (c1 - c - 1) * 16), other=0)
        else:
            p = tl.load(w_ptrs, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
        p_hi = p >> 12  # nibbles 5..7 are read from here (see dequant)
        for i in tl.static_range(8):
            if i % GROUP_NIBS == 0:
                s, z = nibble_params(s_ptr, z_ptr, c, i, group_size, N, offs_n, n_mask, SYMMETRIC)
                part = tl.full([16, BLOCK_N], 0.0, tl.float32)
            q, inv16j = nibble_f32(p, p_hi, z, i)
            xi = tl.load(x_ptrs + 16 * i).to(tl.float32) * inv16j
            part += xi[:, None] * q
            if i % GROUP_NIBS == GROUP_NIBS - 1:
                acc += part * s[None, :]
        w_ptrs += 16 * N
        x_ptrs += 128
    offs_m = pid_m + tl.arange(0, 1)  # the program's one row
    write_tile(tl.sum(acc, 0)[None, :], pid, pid_k, offs_m, offs_m < M, offs_n, n_mask, b_ptr, y_ptr, p_ptr, cnt_ptr,
               M, N, stride_ym, HAS_BIAS, SPLIT_OUT, ATOMIC, LAST)


@triton.jit
def gemv_f16x2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr,
                      M, N, K, group_size, stride_xm, stride_ym, chunks_per_split,
                      BLOCK_N: tl.constexpr, GROUP_NIBS: tl.constexpr, SYMMETRIC: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr, ATOMIC: tl.constexpr, LAST: tl.constexpr,
                      EVEN_N: tl.constexpr, G128: tl.constexpr, USE_ASM: tl.constexpr):
    """float16 x, groups of 64 or more: per word, the four code pairs (q − z)/16 times the matching pairs of x
    summed in float16x2 (`f16x2_products`), converted to float32 once per word and scaled by s there; the 1/16
    is taken out at the end. The next chunk's codes are always loaded ahead. EVEN_N: BLOCK_N divides N (no
    masks on the codes); G128: groups of exactly one chunk; USE_ASM: inline PTX (else the emulation)."""
    pid, pid_k, pid_m, _, _, offs_n, n_mask, offs_r, _, c0, c1, w_ptrs = program_tile(
        w_ptr, M, N, K, chunks_per_split, 1, BLOCK_N)
    acc = tl.full([16, BLOCK_N], 0.0, tl.float32)
    x_ptrs = x_ptr + pid_m * stride_xm + c0 * 128 + offs_r
    if EVEN_N:
        p_next = tl.load(w_ptrs)
    else:
        p_next = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
    for c in range(c0, c1):
        p = p_next
        # the next chunk's codes are loaded while this one is used (the last chunk is loaded twice, unmasked)
        step = tl.minimum(c + 1, c1 - 1) - c0
        if EVEN_N:
            p_next = tl.load(w_ptrs + step * 16 * N)
        else:
            p_next = tl.load(w_ptrs + step * 16 * N, mask=n_mask[None, :], other=0)
        g_lo, g_hi = pair_groups(c, group_size, GROUP_NIBS, G128)
        # scales and zero points as [1, BLOCK_N] rows of the weight tile's layout
        s_lo = group_scales(s_ptr, g_lo, N, offs_n[None, :], n_mask[None, :])
        zz_lo = group_zeros(z_ptr, g_lo, N, offs_n[None, :], n_mask[None, :], SYMMETRIC)
        if GROUP_NIBS == 8:
            s_hi = s_lo
            zz_hi = zz_lo
        else:
            s_hi = group_scales(s_ptr, g_hi, N, offs_n[None, :], n_mask[None, :])
            zz_hi = group_zeros(z_ptr, g_hi, N, offs_n[None, :], n_mask[None, :], SYMMETRIC)
        z_a, z_b = addend_pairs(zz_lo, zz_hi, 64.0, 4.0, 0.0625)
        # x pairs (column 16 j + r, column 64 + 16 j + r), j = 0..3
        x0 = load_f16x2(x_ptrs, 64)[:, None]
        x1 = load_f16x2(x_ptrs + 16, 64)[:, None]
        x2 = load_f16x2(x_ptrs + 32, 64)[:, None]
        x3 = load_f16x2(x_ptrs + 48, 64)[:, None]
        h_lo, h_hi = f16x2_products(p, x0, x1, x2, x3, z_a, z_b, USE_ASM)
        acc += h_lo * s_lo  # the products carry a factor 1/16, taken out at the end
        acc += h_hi * s_hi
        x_ptrs += 128
    offs_m = pid_m + tl.arange(0, 1)  # the program's one row
    write_tile(tl.sum(acc, 0)[None, :] * 16.0, pid, pid_k, offs_m, offs_m < M, offs_n, n_mask, b_ptr, y_ptr, p_ptr,
               cnt_ptr, M, N, stride_ym, HAS_BIAS, SPLIT_OUT, ATOMIC, LAST)
