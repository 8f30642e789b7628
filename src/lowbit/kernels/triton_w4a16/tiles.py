"""The tile a triton-w4a16 program owns and how its result reaches y (`@triton.jit` helpers shared by every
kernel variant), and the second kernel that sums split-K partial sums (see config's docstring for the split)."""

import triton
import triton.language as tl


@triton.jit
def program_tile(w_ptr, M, N, K, chunks_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: (pid, pid_k, pid_m, offs_m, m_mask, offs_n, n_mask, offs_r, offs_k, c0, c1, w_ptrs):
    its rows offs_m and output features offs_n (with masks), a chunk's 16 word rows and 128 input columns, its
    K chunks [c0, c1) and the pointers of chunk c0's [16, BLOCK_N] weight words."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_n = pid // num_m  # programs sharing a weight tile are neighbours (L2 reuse when M spans several blocks)
    pid_m = pid % num_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, 16)
    offs_k = tl.arange(0, 128)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n_chunks = K // 128
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, n_chunks)
    w_ptrs = w_ptr + (c0 * 16 + offs_r)[:, None] * N + offs_n[None, :]
    return pid, pid_k, pid_m, offs_m, m_mask, offs_n, n_mask, offs_r, offs_k, c0, c1, w_ptrs


@triton.jit
def write_tile(out, pid, pid_k, offs_m, m_mask, offs_n, n_mask, b_ptr, y_ptr, p_ptr, cnt_ptr, M, N, stride_ym,
               HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr, ATOMIC: tl.constexpr, LAST: tl.constexpr):
    """The program's float32 [BLOCK_M, BLOCK_N] result `out`: into y (plus the bias) when it is the whole sum,
    else a split-K partial sum (see config)."""
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_OUT:
        if ATOMIC:  # one zeroed float32 [M, N] buffer that stays in L2
            tl.atomic_add(p_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=mask, sem="relaxed")
        else:  # a [SPLIT_K, M, N] buffer
            tl.store(p_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], out, mask=mask)
            if LAST:
                # The program that finishes a tile last sums the tile's SPLIT_K partial sums and writes y: one
                # counter per tile, incremented with release / acquire semantics after a barrier (so that all of
                # this program's partial sums are written first), and reset to 0 for the next call.
                tl.debug_barrier()
                done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
                if done == tl.num_programs(1) - 1:
                    tl.debug_barrier()
                    tot = tl.load(p_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0.0,
                                  cache_modifier=".cg")
                    for sk in range(1, tl.num_programs(1)):
                        tot += tl.load(p_ptr + sk * M * N + offs_m[:, None] * N + offs_n[None, :], mask=mask,
                                       other=0.0, cache_modifier=".cg")
                    if HAS_BIAS:
                        tot += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], tot.to(y_ptr.dtype.element_ty),
                             mask=mask)
                    tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, M, N, stride_ym, split_k,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = the sum of split_k float32 [M, N] partial sums (+ bias), in y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for s in range(split_k):
        acc += tl.load(p_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)
