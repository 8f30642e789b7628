"""How triton-w4a16 cuts a product into programs: the kernel variants (`Mode`), the block sizes and variant
chosen per shape (`default_config`), and the split of K across programs (`split_for`).

Work split: a program owns BLOCK_M rows × BLOCK_N output features and a contiguous run of K chunks. With
SPLIT_K > 1 (small M, so that enough programs fill the GPU) the programs' float32 partial sums go either to a
[SPLIT_K, M, N] buffer or (ATOMIC) are added atomically into one zeroed [M, N] buffer, and a second small kernel
sums / converts them (with the bias) into y — or (LAST) they go to the [SPLIT_K, M, N] buffer and the program
that finishes a tile last sums them into y itself, so no second kernel runs. With SPLIT_K = 1 the bias is added
and y written by the main kernel.
"""

from __future__ import annotations

import enum

from .layout import CHUNK


class Mode(enum.IntEnum):
    """The kernel variants (the config key MODE; the values are those of earlier configs and benchmarks)."""
    GEMV_F32 = 0        # M = 1: float32 codes, elementwise products in registers, one reduction at the end
    DOT_PER_NIBBLE = 1  # one tensor-core dot per nibble: x[:, 16 i : 16 i + 16] × Ŵ-block i (optionally DQ16)
    DOT_UNPACKED = 2    # the chunk's 8 nibbles unpacked into one [128, BLOCK_N] tile, one dot
    DOT_TRANSPOSED = 3  # as DOT_UNPACKED, computing yᵀ = Ŵ·xᵀ so that the weight tile is the MMA's register operand
    GEMV_F16X2 = 4      # M = 1, float16 x, groups of 64 or more: codes and products on float16 pairs


GEMV_MODES = (Mode.GEMV_F32, Mode.GEMV_F16X2)
DOT_MODES = (Mode.DOT_PER_NIBBLE, Mode.DOT_UNPACKED, Mode.DOT_TRANSPOSED)


def split_for(cfg: dict, m: int, n: int, k: int, num_sms: int, per_sm: int, one_wave: bool = False) -> int:
    """SPLIT_K giving about `per_sm` programs per multiprocessor (at most that many with `one_wave`), with at
    least a few chunks per split."""
    chunks = k // CHUNK
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    min_chunks = 8 if chunks >= 64 else 4
    want = per_sm * num_sms // tiles if one_wave else -(-per_sm * num_sms // tiles)
    split = max(1, min(want, chunks // min_chunks))
    return -(-chunks // -(-chunks // split))  # same number of chunks per split (but the last)


def default_config(m: int, n: int, k: int, num_sms: int = 132, f16x2: bool = True) -> dict:
    """Block sizes for an [m, k] × [k, n] product, the best measured on an H100 (benchmarks/gpu_w4a16.py;
    float16 x, int4 g128) for N×K = 4096², 8192², 8192×28672, 28672×8192 and M = 1, 16, 64, 128.
    `f16x2`: the activations are float16 and groups have 64 columns or more (GEMV_F16X2 can run).

    M = 1: GEMV_F16X2, BLOCK_N = 64, 4 warps, last-program reduction, split-K up to 9 programs per SM (10 fit at
    once with its 48 registers: one wave, no tail of a few programs); else GEMV_F32. M ≤ 16: DOT_PER_NIBBLE,
    16×64. M ≤ 64: DOT_UNPACKED, 64×128, atomic partial sums. Above: DOT_TRANSPOSED, 128×256 or 128×128 with 8
    warps for N ≤ 8192 and N·K ≥ 8192², else 128×64. (DQ16 and LAST on the dot variants measured slower there
    and are left off.)

    Keys: BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages; MODE (a `Mode`; BLOCK_M = 1 means a GEMV: GEMV_F16X2
    if asked for and possible, else GEMV_F32; BLOCK_M > 1 defaults to DOT_UNPACKED); PREFETCH (GEMV_F32: load
    the next chunk ahead; GEMV_F16X2 always does); DQ16 (DOT_PER_NIBBLE: dequantize on float16 pairs where
    possible); ATOMIC (split-K partial sums added atomically into one float32 [M, N] buffer, summed by a second
    kernel); LAST (split-K partial sums written to a [SPLIT_K, M, N] buffer and summed by the last program to
    finish each tile, in the same kernel); neither: a [SPLIT_K, M, N] buffer summed by a second kernel.
    GEMV_F16X2 wants BLOCK_N below 32 · num_warps (its per-column scale loads then take the weight tile's
    layout)."""
    one_wave = False
    if m == 1 and f16x2:
        cfg, per_sm, one_wave = dict(BLOCK_M=1, BLOCK_N=64, MODE=Mode.GEMV_F16X2, num_warps=4, num_stages=1,
                                     LAST=True), 9, True
    elif m == 1:
        cfg, per_sm = dict(BLOCK_M=1, BLOCK_N=64, num_warps=4, num_stages=1, PREFETCH=True, LAST=True), 16
    elif m <= 16:
        cfg, per_sm = dict(BLOCK_M=16, BLOCK_N=64, MODE=Mode.DOT_PER_NIBBLE, num_warps=4, num_stages=4), 4
    elif m <= 64:
        cfg, per_sm = dict(BLOCK_M=64, BLOCK_N=128, MODE=Mode.DOT_UNPACKED, num_warps=4, num_stages=3,
                           ATOMIC=True), 8
    elif n <= 8192 and n * k >= 8192 * 8192:
        cfg, per_sm = dict(BLOCK_M=128, BLOCK_N=256 if k <= 8192 else 128, MODE=Mode.DOT_TRANSPOSED, num_warps=8,
                           num_stages=3, ATOMIC=True), 2
    else:
        cfg, per_sm = dict(BLOCK_M=128, BLOCK_N=64, MODE=Mode.DOT_TRANSPOSED, num_warps=4, num_stages=3), 2
    cfg["SPLIT_K"] = split_for(cfg, m, n, k, num_sms, per_sm, one_wave)
    return cfg
