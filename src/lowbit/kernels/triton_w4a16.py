"""triton-w4a16 — a Triton GEMM/GEMV for 4-bit integer weights and 16-bit activations on CUDA GPUs.

y[M, N] = x[M, K] · Ŵ[N, K]ᵀ (+ bias), with Ŵ = (q − z) · s dequantized tile by tile in registers (the full
dequantized weight is never written anywhere) and products accumulated in float32. Activations may be
float16, bfloat16 or float32 (the output has the activation dtype).

Resident layout (built by `repack`, inverted exactly by `unpack`). K is cut into chunks of 128 input columns;
chunk c covers columns [128·c, 128·c + 128) and is stored as 16 rows of 32-bit words:
    qweight  int32 [K / 8, N]  K-major: row 16·c + r, column n is one word holding the 4-bit codes of
                               W[n, 128·c + 16·i + r] for i = 0..7, code i in bits [4·i, 4·i + 4) (nibble 0
                               lowest). Adjacent words along a row belong to adjacent output features, so a
                               program that loads a [16, BLOCK_N] tile reads BLOCK_N·4 contiguous bytes per row
                               (16-byte vectors, 4 output features per thread), and nibble i of that tile is the
                               [16, BLOCK_N] block of input columns 128·c + 16·i .. 128·c + 16·i + 15 — contiguous
                               in x, so no shuffle is needed before the tensor-core dot.
    scales   float16 [G, N]    the storage scales transposed (row g = group g), G = K / group_size.
    zeros    float16 [G, N]    asymmetric only: the storage zero points z (integers 0..15, exact in float16),
                               transposed. Symmetric weights use the implicit z = 8 and store no zeros.
A code becomes a float without an integer-to-float conversion, in one of two ways:
  * float32: (word & (15 << 4·j)) | 0x4B000000 read as a float32 is 2²³ + q·16^j, so one subtraction of
    2²³ + z·16^j yields (q − z)·16^j exactly and the factor 16^j goes into the scale (or, in the GEMV, into x).
    Nibbles 0..4 are read in place (j = i), nibbles 5..7 from the word shifted right by 12 (j = i − 3), so each
    word costs a single shift.
  * float16 pairs (float16 activations, groups of 64 or more; inline PTX on the GPU, the same operations
    emulated lane by lane under the interpreter): (word & 0x000F000F) | 0x64006400 read as two float16 numbers
    is (1024 + q0, 1024 + q4) — nibbles 0 and 4, low half first —, (word & 0x00F000F0) | 0x64006400 is
    (1024 + 16·q1, 1024 + 16·q5), and the same two masks on word >> 8 give nibbles 2, 6 and 3, 7: one shift and
    four logic operations per word, then one float16x2 fma per pair gives (q − z) exactly (or (q − z)/16). The
    low halves hold nibbles 0..3 (input columns 0..63 of the chunk, one group when groups have 64 columns or
    more), the high halves nibbles 4..7 (columns 64..127).

Work split: a program owns BLOCK_M rows × BLOCK_N output features and a contiguous run of K chunks. With
SPLIT_K > 1 (small M, so that enough programs fill the GPU) the programs' float32 partial sums go either to a
[SPLIT_K, M, N] buffer or (ATOMIC) are added atomically into one zeroed [M, N] buffer, and a second small kernel
sums / converts them (with the bias) into y — or (LAST) they go to the [SPLIT_K, M, N] buffer and the program
that finishes a tile last (one int32 counter per tile, atomically incremented, reset by that program, kept
between calls per device and stream) sums them into y itself, so no second kernel runs. With SPLIT_K = 1 the
bias is added and y written by the main kernel. Variants (MODE): 0, for M = 1, a GEMV (float32 codes,
elementwise products in registers, one reduction at the end); 4, for M = 1, float16 x and groups of 64 or
more, a GEMV on float16 pairs: per word the four pairs (q − z)/16 are multiplied by the matching pairs of x
(x[16·j + r], x[64 + 16·j + r]) and summed in float16x2 (four products per half, |sum| < 4·max|x|, so |x| up to about 16000), then
converted to float32 and scaled by s there; 1, one tensor-core dot per nibble, x[:, 16·i : 16·i + 16] × Ŵ-block
i (DQ16: Ŵ = (q − z)·s computed on float16 pairs, for float16 x and groups of 64 or more); 2, the chunk unpacked
into one [128, BLOCK_N] tile and one dot; 3, as 2 but computing yᵀ = Ŵ·xᵀ, so that the weight tile is the
MMA's register operand. `default_config` picks block sizes and the variant from M, N, K.

Requirements (see `TritonW4A16Kernel.unsupported`): 4-bit integer weights, K divisible by 128, group size
16, 32, 64, 128 or a multiple of 128 (per channel included) dividing K. Runs on CUDA devices; on CPU only under
Triton's interpreter (environment variable TRITON_INTERPRET=1), which is how the tests exercise it, and then
only when the kernel is asked for by name.
"""

from __future__ import annotations

import functools
import os

import torch

from ..formats import QuantizedTensor
from .base import Kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; the kernel reports itself unsupported
    triton = None
    tl = None

CHUNK = 128  # input columns per packed chunk (16 rows of int32 words)
_ROWS = CHUNK // 8


# ------------------------------------------------------------------------------------------------ layout ----
def _group_ok(group: int) -> bool:
    return group in (16, 32, 64) or group % CHUNK == 0


def repack(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """lowbit's 4-bit storage tensors -> this kernel's resident tensors (see the module docstring)."""
    n, k = qt.shape
    if qt.spec.kind != "int" or qt.spec.bits != 4 or k % CHUNK:
        raise ValueError(f"triton-w4a16 needs 4-bit integer weights with K divisible by {CHUNK}")
    codes = _nibbles_of_bytes(qt.qweight)                          # uint8 [N, K]
    c = codes.reshape(n, k // CHUNK, 8, _ROWS).permute(1, 3, 0, 2)  # [chunk, r, n, i]
    words = torch.zeros(k // CHUNK, _ROWS, n, dtype=torch.int64, device=codes.device)
    for i in range(8):
        words |= c[..., i].to(torch.int64) << (4 * i)
    words = torch.where(words >= 2**31, words - 2**32, words)
    out = {"qweight": words.reshape(k // 8, n).to(torch.int32).contiguous(),
           "scales": qt.scales.t().contiguous()}
    if qt.zeros is not None:
        out["zeros"] = qt.zeros.t().to(torch.float16).contiguous()
    return out


def unpack(packed: dict[str, torch.Tensor], spec, shape: tuple[int, int]) -> QuantizedTensor:
    """The exact inverse of `repack`."""
    n, k = shape
    words = packed["qweight"].to(torch.int64) & 0xFFFFFFFF          # [K/8, N]
    nib = torch.stack([(words >> (4 * i)) & 15 for i in range(8)])  # [i, K/8, N]
    codes = nib.reshape(8, k // CHUNK, _ROWS, n).permute(3, 1, 0, 2).reshape(n, k).to(torch.uint8)
    zeros = packed.get("zeros")
    zeros = None if zeros is None else zeros.t().to(torch.uint8).contiguous()
    return QuantizedTensor.from_codes(codes, packed["scales"].t().contiguous(), zeros, spec)


def _nibbles_of_bytes(q: torch.Tensor) -> torch.Tensor:
    return torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], -1)


# ------------------------------------------------------------------------------------------------ kernels ---
def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The kernels call only Triton builtins, no functions of triton.language.standard (tl.sum, tl.zeros, tl.cdiv):
# those are decorated when triton is imported, so under an interpreter switched on after that import they could
# not be called from an interpreted kernel. (The final GEMV sum hands standard's combine function to tl.reduce,
# which the interpreter recognises instead of calling it.)
def _w4a16_body(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr,
                M, N, K, group_size, stride_xm, stride_ym, chunks_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_NIBS: tl.constexpr,
                SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr,
                MODE: tl.constexpr, PREFETCH: tl.constexpr, ATOMIC: tl.constexpr, DOT_F32: tl.constexpr,
                LAST: tl.constexpr, EVEN_N: tl.constexpr, G128: tl.constexpr, USE_ASM: tl.constexpr,
                DQ16: tl.constexpr):
    # MODE 0: GEMV (BLOCK_M = 1; elementwise products, one reduction at the end)
    # MODE 1: one tl.dot per nibble, x[:, 16 i : 16 i + 16] × W[16 i : 16 i + 16, :]
    # MODE 2: the chunk's 8 nibbles unpacked into one [128, BLOCK_N] tile, one tl.dot
    # MODE 3: as 2, computing yᵀ = W xᵀ (the weight tile is the MMA's M side, the activations its N side)
    # MODE 4: GEMV for float16 x and groups of 64 or more, dequantizing two nibbles per 32-bit operation (below)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_n = pid // num_m  # programs sharing a weight tile are neighbours (L2 reuse when M spans several blocks)
    pid_m = pid % num_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, 16)
    offs_k = tl.arange(0, 128)
    offs_i = tl.arange(0, 8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M

    n_chunks = K // 128
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, n_chunks)

    w_ptrs = w_ptr + (c0 * 16 + offs_r)[:, None] * N + offs_n[None, :]
    if MODE == 0:
        acc = tl.full([16, BLOCK_N], 0.0, tl.float32)
        x_ptrs = x_ptr + pid_m * stride_xm + c0 * 128 + offs_r
    elif MODE == 1:
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (c0 * 128 + offs_r)[None, :]
    elif MODE == 2:
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (c0 * 128 + offs_k)[None, :]
    elif MODE == 3:
        acc = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (c0 * 128 + offs_k)[:, None]
    else:
        acc = tl.full([16, BLOCK_N], 0.0, tl.float32)
        x_ptrs = x_ptr + pid_m * stride_xm + c0 * 128 + offs_r

    if MODE == 4:
        # Two codes per 32-bit operation: (word & 0x000F000F) | 0x64006400 is a pair of float16 numbers 1024 + q
        # (nibbles 0 and 4), (word & 0x00F000F0) | 0x64006400 the pair 1024 + 16 q (nibbles 1 and 5), and the
        # same on word >> 8 gives nibbles 2, 6 and 3, 7. One float16x2 fma per pair turns them into (q − z) / 16
        # exactly; the low halves then hold nibbles 0..3 (input columns 0..63 of the chunk), the high halves
        # nibbles 4..7 (columns 64..127), multiplied by the matching pairs of x in float16x2 (four products per
        # half, |sum| < 4 |x|), converted to float32 once per word and scaled by 16 s in float32.
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
            if G128:
                g_lo = c
                g_hi = c
            elif GROUP_NIBS == 8:
                g_lo = (c * 128) // group_size
                g_hi = g_lo
            else:  # groups of 64: the two halves of the chunk
                g_lo = 2 * c
                g_hi = 2 * c + 1
            # scales and zero points as [1, BLOCK_N] rows of the weight tile's layout
            s_lo = tl.load(s_ptr + g_lo * N + offs_n[None, :], mask=n_mask[None, :], other=0.0).to(tl.float32)
            if SYMMETRIC:
                zz_lo = tl.full([1, BLOCK_N], 8.0, tl.float32)
            else:
                zz_lo = tl.load(z_ptr + g_lo * N + offs_n[None, :], mask=n_mask[None, :], other=0.0).to(tl.float32)
            if GROUP_NIBS == 8:
                s_hi = s_lo
                zz_hi = zz_lo
            else:
                s_hi = tl.load(s_ptr + g_hi * N + offs_n[None, :], mask=n_mask[None, :], other=0.0).to(tl.float32)
                if SYMMETRIC:
                    zz_hi = zz_lo
                else:
                    zz_hi = tl.load(z_ptr + g_hi * N + offs_n[None, :], mask=n_mask[None, :],
                                    other=0.0).to(tl.float32)
            # float16x2 addends −(64 + z/16) (for 1024 + q scaled by 1/16) and −(4 + z/16) (1024 + 16 q by 1/256)
            a_lo = (-64.0 - zz_lo * 0.0625).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            a_hi = (-64.0 - zz_hi * 0.0625).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
            b_lo = (-4.0 - zz_lo * 0.0625).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            b_hi = (-4.0 - zz_hi * 0.0625).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
            z_a = a_lo | (a_hi << 16)
            z_b = b_lo | (b_hi << 16)
            # x pairs (column 16 j + r, column 64 + 16 j + r) as float16x2, j = 0..3
            x0 = ((tl.load(x_ptrs).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
                  | (tl.load(x_ptrs + 64).to(tl.int16, bitcast=True).to(tl.int32) << 16))[:, None]
            x1 = ((tl.load(x_ptrs + 16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
                  | (tl.load(x_ptrs + 80).to(tl.int16, bitcast=True).to(tl.int32) << 16))[:, None]
            x2 = ((tl.load(x_ptrs + 32).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
                  | (tl.load(x_ptrs + 96).to(tl.int16, bitcast=True).to(tl.int32) << 16))[:, None]
            x3 = ((tl.load(x_ptrs + 48).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
                  | (tl.load(x_ptrs + 112).to(tl.int16, bitcast=True).to(tl.int32) << 16))[:, None]
            if USE_ASM:
                h_lo, h_hi = tl.inline_asm_elementwise(
                    """{
                    .reg .b32 t0, t1, t2, t3, u, h, k16, k256;
                    .reg .b16 hl, hh;
                    mov.b32 k16, 0x2C002C00;
                    mov.b32 k256, 0x1C001C00;
                    lop3.b32 t0, $2, 0x000F000F, 0x64006400, 0xEA;
                    lop3.b32 t1, $2, 0x00F000F0, 0x64006400, 0xEA;
                    shr.u32 u, $2, 8;
                    lop3.b32 t2, u, 0x000F000F, 0x64006400, 0xEA;
                    lop3.b32 t3, u, 0x00F000F0, 0x64006400, 0xEA;
                    fma.rn.f16x2 t0, t0, k16, $7;
                    fma.rn.f16x2 t1, t1, k256, $8;
                    fma.rn.f16x2 t2, t2, k16, $7;
                    fma.rn.f16x2 t3, t3, k256, $8;
                    mul.rn.f16x2 h, $3, t0;
                    fma.rn.f16x2 h, $4, t1, h;
                    fma.rn.f16x2 h, $5, t2, h;
                    fma.rn.f16x2 h, $6, t3, h;
                    mov.b32 {hl, hh}, h;
                    cvt.f32.f16 $0, hl;
                    cvt.f32.f16 $1, hh;
                    }""",
                    "=f,=f,r,r,r,r,r,r,r", [p, x0, x1, x2, x3, z_a, z_b],
                    dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
            else:  # the same operations, one float16 lane at a time (Triton's interpreter runs no assembly)
                u0 = p.to(tl.uint32, bitcast=True)
                u8 = u0 >> 8
                t0 = (u0 & 0x000F000F) | 0x64006400
                t1 = (u0 & 0x00F000F0) | 0x64006400
                t2 = (u8 & 0x000F000F) | 0x64006400
                t3 = (u8 & 0x00F000F0) | 0x64006400
                zu_a = z_a.to(tl.uint32, bitcast=True)
                zu_b = z_b.to(tl.uint32, bitcast=True)
                x0u = x0.to(tl.uint32, bitcast=True)
                x1u = x1.to(tl.uint32, bitcast=True)
                x2u = x2.to(tl.uint32, bitcast=True)
                x3u = x3.to(tl.uint32, bitcast=True)
                h_lo = ((t0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.0625
                        + (zu_a & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))
                h_lo = h_lo * (x0u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                h_lo = h_lo.to(tl.float16).to(tl.float32)
                h_hi = ((t0 >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.0625
                        + (zu_a >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))
                h_hi = h_hi * (x0u >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                h_hi = h_hi.to(tl.float16).to(tl.float32)
                # pairs 1..3: t1, t3 hold 1024 + 16 q (scaled by 1/256), t2 holds 1024 + q (by 1/16)
                d_lo = ((t1 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.00390625
                        + (zu_b & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))
                d_hi = ((t1 >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.00390625
                        + (zu_b >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))
                h_lo = (d_lo * (x1u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                        + h_lo).to(tl.float16).to(tl.float32)
                h_hi = (d_hi * (x1u >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                        + h_hi).to(tl.float16).to(tl.float32)
                d_lo = ((t2 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.0625
                        + (zu_a & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))
                d_hi = ((t2 >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.0625
                        + (zu_a >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))
                h_lo = (d_lo * (x2u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                        + h_lo).to(tl.float16).to(tl.float32)
                h_hi = (d_hi * (x2u >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                        + h_hi).to(tl.float16).to(tl.float32)
                d_lo = ((t3 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.00390625
                        + (zu_b & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))
                d_hi = ((t3 >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.00390625
                        + (zu_b >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))
                h_lo = (d_lo * (x3u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                        + h_lo).to(tl.float16).to(tl.float32)
                h_hi = (d_hi * (x3u >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                        + h_hi).to(tl.float16).to(tl.float32)
            acc += h_lo * s_lo  # the products carry a factor 1/16 (see above), taken out at the end
            acc += h_hi * s_hi
            x_ptrs += 128
    else:
        if PREFETCH:  # load the next chunk of codes while this one is used (dot modes are pipelined by Triton)
            p_next = tl.load(w_ptrs, mask=n_mask[None, :] & (offs_r[:, None] < (c1 - c0) * 16), other=0)
        for c in range(c0, c1):
            if PREFETCH:
                p = p_next.to(tl.uint32, bitcast=True)
                p_next = tl.load(w_ptrs + 16 * N, mask=n_mask[None, :] & (offs_r[:, None] < (c1 - c - 1) * 16), other=0)
            else:
                p = tl.load(w_ptrs, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
            # Nibble i is read in place, without shifting it down: (word & (15 << 4 j)) | 0x4B000000 read as a float32
            # is 2^23 + q·16^j. Nibbles 0..4 come from the word itself (j = i), nibbles 5..7 from word >> 12 (j = i − 3),
            # so that q·16^j stays below 2^23; the factor 16^j is taken out again through the scale (or x).
            p_hi = p >> 12
            if MODE >= 2:
                # all 8 nibbles at once: [8, 16, BLOCK_N], row 16 i + r of the chunk is nibble i of word row r
                if GROUP_NIBS == 8:  # the chunk lies in one group
                    g = (c * 128) // group_size
                    s3 = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, None, :]
                    if SYMMETRIC:
                        z3 = 8.0
                    else:
                        z3 = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, None, :]
                else:
                    gi = ((c * 128 + 16 * offs_i) // group_size)[:, None] * N + offs_n[None, :]
                    s3 = tl.load(s_ptr + gi, mask=n_mask[None, :], other=0.0).to(tl.float32)[:, None, :]
                    if SYMMETRIC:
                        z3 = 8.0
                    else:
                        z3 = tl.load(z_ptr + gi, mask=n_mask[None, :], other=0.0).to(tl.float32)[:, None, :]
                j = tl.where(offs_i < 5, offs_i, offs_i - 3)
                pow16 = tl.exp2((4 * j).to(tl.float32))[:, None, None]
                word = tl.where((offs_i < 5)[:, None, None], p[None, :, :], p_hi[None, :, :])
                bits = (word & (15 << (4 * j)).to(tl.uint32)[:, None, None]) | 0x4B000000
                q3 = bits.to(tl.float32, bitcast=True) - (z3 * pow16 + 8388608.0)  # (q − z)·16^j, exact
                w = tl.reshape((q3 * (s3 / pow16)).to(x_ptr.dtype.element_ty), [128, BLOCK_N])
                if MODE == 2:
                    xk = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
                    if DOT_F32:  # Triton's interpreter multiplies bfloat16 tiles as raw bits: give it float32
                        acc = tl.dot(xk.to(tl.float32), w.to(tl.float32), acc)
                    else:
                        acc = tl.dot(xk, w, acc)
                else:
                    xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
                    if DOT_F32:
                        acc = tl.dot(tl.trans(w).to(tl.float32), xt.to(tl.float32), acc)
                    else:
                        acc = tl.dot(tl.trans(w), xt, acc)
            elif DQ16:  # MODE 1, float16 x, groups of 64 or more: the codes become float16 two at a time
                if G128:
                    g_lo = c
                    g_hi = c
                elif GROUP_NIBS == 8:
                    g_lo = (c * 128) // group_size
                    g_hi = g_lo
                else:
                    g_lo = 2 * c
                    g_hi = 2 * c + 1
                s_lo = tl.load(s_ptr + g_lo * N + offs_n, mask=n_mask, other=0.0)
                s_hi = tl.load(s_ptr + g_hi * N + offs_n, mask=n_mask, other=0.0)
                if SYMMETRIC:
                    zz_lo = tl.full([BLOCK_N], 8.0, tl.float32)
                    zz_hi = zz_lo
                else:
                    zz_lo = tl.load(z_ptr + g_lo * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    zz_hi = tl.load(z_ptr + g_hi * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                # float16x2 operands: the scales (s_lo, s_hi), −(1024 + z) for 1024 + q, −(64 + z) for (1024 + 16 q) / 16
                s_pair = ((s_lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
                          | (s_hi.to(tl.int16, bitcast=True).to(tl.int32) << 16))[None, :]
                a_lo = (-1024.0 - zz_lo).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                a_hi = (-1024.0 - zz_hi).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
                b_lo = (-64.0 - zz_lo).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                b_hi = (-64.0 - zz_hi).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
                z_a = (a_lo | (a_hi << 16))[None, :]
                z_b = (b_lo | (b_hi << 16))[None, :]
                if USE_ASM:
                    w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                        """{
                        .reg .b32 t0, t1, t2, t3, u, k1, k16;
                        mov.b32 k1, 0x3C003C00;
                        mov.b32 k16, 0x2C002C00;
                        lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xEA;
                        lop3.b32 t1, $8, 0x00F000F0, 0x64006400, 0xEA;
                        shr.u32 u, $8, 8;
                        lop3.b32 t2, u, 0x000F000F, 0x64006400, 0xEA;
                        lop3.b32 t3, u, 0x00F000F0, 0x64006400, 0xEA;
                        fma.rn.f16x2 t0, t0, k1, $10;
                        fma.rn.f16x2 t1, t1, k16, $11;
                        fma.rn.f16x2 t2, t2, k1, $10;
                        fma.rn.f16x2 t3, t3, k16, $11;
                        mul.rn.f16x2 t0, t0, $9;
                        mul.rn.f16x2 t1, t1, $9;
                        mul.rn.f16x2 t2, t2, $9;
                        mul.rn.f16x2 t3, t3, $9;
                        mov.b32 {$0, $4}, t0;
                        mov.b32 {$1, $5}, t1;
                        mov.b32 {$2, $6}, t2;
                        mov.b32 {$3, $7}, t3;
                        }""",
                        "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r", [p.to(tl.int32, bitcast=True), s_pair, z_a, z_b],
                        dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                               tl.float16), is_pure=True, pack=1)
                else:  # the same operations, one float16 lane at a time
                    u8 = p >> 8
                    t0 = (p & 0x000F000F) | 0x64006400
                    t1 = (p & 0x00F000F0) | 0x64006400
                    t2 = (u8 & 0x000F000F) | 0x64006400
                    t3 = (u8 & 0x00F000F0) | 0x64006400
                    su = s_pair.to(tl.uint32, bitcast=True)
                    s_l = (su & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                    s_h = (su >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                    za = z_a.to(tl.uint32, bitcast=True)
                    zb = z_b.to(tl.uint32, bitcast=True)
                    za_l = (za & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                    za_h = (za >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                    zb_l = (zb & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                    zb_h = (zb >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                    w0 = (((t0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) + za_l)
                          * s_l).to(tl.float16)
                    w4 = (((t0 >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) + za_h)
                          * s_h).to(tl.float16)
                    w1 = (((t1 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.0625 + zb_l)
                          * s_l).to(tl.float16)
                    w5 = (((t1 >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.0625 + zb_h)
                          * s_h).to(tl.float16)
                    w2 = (((t2 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) + za_l)
                          * s_l).to(tl.float16)
                    w6 = (((t2 >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) + za_h)
                          * s_h).to(tl.float16)
                    w3 = (((t3 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.0625 + zb_l)
                          * s_l).to(tl.float16)
                    w7 = (((t3 >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 0.0625 + zb_h)
                          * s_h).to(tl.float16)
                # nibble i is the [16, BLOCK_N] block of input columns 16 i .. 16 i + 15 of the chunk
                acc = tl.dot(tl.load(x_ptrs, mask=m_mask[:, None], other=0.0), w0, acc)
                acc = tl.dot(tl.load(x_ptrs + 16, mask=m_mask[:, None], other=0.0), w1, acc)
                acc = tl.dot(tl.load(x_ptrs + 32, mask=m_mask[:, None], other=0.0), w2, acc)
                acc = tl.dot(tl.load(x_ptrs + 48, mask=m_mask[:, None], other=0.0), w3, acc)
                acc = tl.dot(tl.load(x_ptrs + 64, mask=m_mask[:, None], other=0.0), w4, acc)
                acc = tl.dot(tl.load(x_ptrs + 80, mask=m_mask[:, None], other=0.0), w5, acc)
                acc = tl.dot(tl.load(x_ptrs + 96, mask=m_mask[:, None], other=0.0), w6, acc)
                acc = tl.dot(tl.load(x_ptrs + 112, mask=m_mask[:, None], other=0.0), w7, acc)
            else:
                for i in tl.static_range(8):
                    if i % GROUP_NIBS == 0:
                        g = (c * 128 + 16 * i) // group_size
                        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                        if SYMMETRIC:
                            z = tl.full([BLOCK_N], 8.0, tl.float32)
                        else:
                            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                        if MODE == 0:
                            part = tl.full([16, BLOCK_N], 0.0, tl.float32)
                    if i < 5:
                        word = p
                    else:
                        word = p_hi
                    shift = 4 * (i - 3 * (i // 5))  # 4 j
                    bits = (word & (15 << shift)) | 0x4B000000
                    q = bits.to(tl.float32, bitcast=True) - (z * (1 << shift) + 8388608.0)[None, :]  # (q − z)·16^j, exact
                    if MODE == 0:
                        xi = tl.load(x_ptrs + 16 * i).to(tl.float32) * (1.0 / (1 << shift))
                        part += xi[:, None] * q
                        if i % GROUP_NIBS == GROUP_NIBS - 1:
                            acc += part * s[None, :]
                    else:
                        w = (q * (s * (1.0 / (1 << shift)))[None, :]).to(x_ptr.dtype.element_ty)
                        xi = tl.load(x_ptrs + 16 * i, mask=m_mask[:, None], other=0.0)
                        if DOT_F32:
                            acc = tl.dot(xi.to(tl.float32), w.to(tl.float32), acc)
                        else:
                            acc = tl.dot(xi, w, acc)
            w_ptrs += 16 * N
            x_ptrs += 128

    if MODE == 0 or MODE == 4:
        out = tl.reduce(acc, 0, tl.standard._sum_combine)[None, :]
        if MODE == 4:
            out = out * 16.0
        offs_m = pid_m + tl.arange(0, 1)
        m_mask = offs_m < M
    elif MODE == 3:
        out = tl.trans(acc)
    else:
        out = acc
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


def _splitk_reduce_body(p_ptr, b_ptr, y_ptr, M, N, stride_ym, split_k,
                        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for s in range(split_k):
        acc += tl.load(p_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _jitted(name: str, interpret: bool):
    """The kernels are decorated on first use, not at import: Triton decides between compiling and
    interpreting when a function is decorated, so this picks up TRITON_INTERPRET as set at call time."""
    return triton.jit({"main": _w4a16_body, "reduce": _splitk_reduce_body}[name])


def _kernel(name: str):
    return _jitted(name, _interpreting())


# -------------------------------------------------------------------------------------------- launching ----
@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_for(cfg: dict, m: int, n: int, k: int, num_sms: int, per_sm: int, one_wave: bool = False) -> int:
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
    `f16x2`: the activations are float16 and groups have 64 columns or more (MODE 4 can run).

    M = 1: MODE 4 (float16 pairs), BLOCK_N = 64, 4 warps, last-program reduction, split-K up to 9 programs per
    SM (10 fit at once with its 48 registers: one wave, no tail of a few programs); else the float32 GEMV.
    M ≤ 16: one dot per nibble, 16×64. M ≤ 64: one dot per chunk, 64×128, atomic partial sums. Above: yᵀ = Ŵ·xᵀ,
    128×256 or 128×128 with 8 warps for N ≤ 8192 and N·K ≥ 8192², else 128×64. (DQ16 and LAST on the dot
    variants measured slower there and are left off.)

    Keys: BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages; MODE (0–4, see the kernel; BLOCK_M = 1 means a
    GEMV: MODE 4 if asked for and possible, else the float32 one); PREFETCH (float32 GEMV: load the next chunk
    ahead; MODE 4 always does); DQ16 (MODE 1: dequantize on float16 pairs where possible); ATOMIC (split-K
    partial sums added atomically into one float32 [M, N] buffer, summed by a second kernel); LAST (split-K
    partial sums written to a [SPLIT_K, M, N] buffer and summed by the last program to finish each tile, in
    the same kernel); neither: a [SPLIT_K, M, N] buffer summed by a second kernel. MODE 4 wants BLOCK_N below
    32 · num_warps (its per-column scale loads then take the weight tile's layout)."""
    one_wave = False
    if m == 1 and f16x2:
        cfg, per_sm, one_wave = dict(BLOCK_M=1, BLOCK_N=64, MODE=4, num_warps=4, num_stages=1, LAST=True), 9, True
    elif m == 1:
        cfg, per_sm = dict(BLOCK_M=1, BLOCK_N=64, num_warps=4, num_stages=1, PREFETCH=True, LAST=True), 16
    elif m <= 16:
        cfg, per_sm = dict(BLOCK_M=16, BLOCK_N=64, MODE=1, num_warps=4, num_stages=4), 4
    elif m <= 64:
        cfg, per_sm = dict(BLOCK_M=64, BLOCK_N=128, MODE=2, num_warps=4, num_stages=3, ATOMIC=True), 8
    elif n <= 8192 and n * k >= 8192 * 8192:
        cfg, per_sm = dict(BLOCK_M=128, BLOCK_N=256 if k <= 8192 else 128, MODE=3, num_warps=8, num_stages=3,
                           ATOMIC=True), 2
    else:
        cfg, per_sm = dict(BLOCK_M=128, BLOCK_N=64, MODE=3, num_warps=4, num_stages=3), 2
    cfg["SPLIT_K"] = _split_for(cfg, m, n, k, num_sms, per_sm, one_wave)
    return cfg


def _f16x2_ok(x: torch.Tensor, group: int) -> bool:
    return x.dtype == torch.float16 and group % 64 == 0


_COUNTERS: dict = {}


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 tile counters for LAST, one buffer per device and stream; every launch leaves them 0."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def w4a16_matmul(x: torch.Tensor, packed: dict[str, torch.Tensor], group_size: int,
                 bias: torch.Tensor | None = None, config: dict | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (float16 / bfloat16 / float32) times the repacked weight; returns [..., N] in x's dtype.

    `group_size` is the storage group size (-1 = per channel); `config` overrides the block sizes (keys as
    returned by `default_config`); `out`, if given, is a contiguous [M, N] tensor of x's dtype (M = the rows
    of x) that receives the result."""
    qweight, scales, zeros = packed["qweight"], packed["scales"], packed.get("zeros")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    group = k if group_size == -1 else group_size
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        if tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {m}x{n} {x.dtype} tensor on {x.device}")
        y = out
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    f16x2 = _f16x2_ok(x, group) and scales.dtype == torch.float16
    if config is None:
        sms = _num_sms(x.device.index or 0) if x.device.type == "cuda" else 4
        config = default_config(m, n, k, sms, f16x2=f16x2)
    cfg = dict(config)
    split = int(cfg.pop("SPLIT_K", 1))
    chunks = k // CHUNK
    per_split = -(-chunks // max(1, min(split, chunks)))
    split = -(-chunks // per_split)
    if cfg["BLOCK_M"] == 1:
        mode = 4 if int(cfg.get("MODE", 0)) == 4 and f16x2 else 0
    else:
        mode = int(cfg.get("MODE", 2))
        if mode not in (1, 2, 3):
            raise ValueError(f"MODE {mode} needs BLOCK_M = 1")
    atomic = split > 1 and bool(cfg.get("ATOMIC", False))
    last = split > 1 and not atomic and bool(cfg.get("LAST", False))
    if split == 1:
        partial = y
    elif atomic:
        partial = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    counters = _counters(x.device, tiles) if last else partial
    _kernel("main")[(tiles, split)](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if has_bias else scales, y, partial,
        counters, m, n, k, group, x2.stride(0), y.stride(0), per_split,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GROUP_NIBS=min(group, CHUNK) // 16,
        SYMMETRIC=zeros is None, HAS_BIAS=has_bias, SPLIT_OUT=split > 1, MODE=mode,
        PREFETCH=bool(cfg.get("PREFETCH", False)), ATOMIC=atomic,
        DOT_F32=x.dtype == torch.bfloat16 and x.device.type == "cpu",
        LAST=last, EVEN_N=n % cfg["BLOCK_N"] == 0, G128=group == CHUNK, USE_ASM=not _interpreting(),
        DQ16=mode == 1 and bool(cfg.get("DQ16", False)) and f16x2,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    if split > 1 and not last:
        block = 1024
        _kernel("reduce")[(triton.cdiv(m * n, block),)](
            partial, bias if has_bias else partial, y, m, n, y.stride(0), 1 if atomic else split,
            HAS_BIAS=has_bias, BLOCK=block, num_warps=4)
    return y.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------- kernel -----
class TritonW4A16Kernel(Kernel):
    name = "triton-w4a16"
    auto_devices = ("cuda",)  # automatic selection never picks it elsewhere (the interpreter is for tests)

    def unsupported(self, spec, shape, device, act=None):
        n, k = shape
        if triton is None:
            return "triton is not installed"
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            return "runs on CUDA GPUs (on CPU only under TRITON_INTERPRET=1)"
        if act is not None:
            return "weight-only: no activation quantization"
        if spec.kind != "int" or spec.bits != 4:
            return "needs 4-bit integer weights"
        if k % CHUNK:
            return f"needs in_features divisible by {CHUNK} (got {k})"
        if spec.group_size != -1 and k % spec.group_size:
            return f"group size {spec.group_size} does not divide in_features={k}"
        if not _group_ok(spec.group_size_for(k)):
            return f"needs group size 16, 32, 64 or a multiple of {CHUNK} (got {spec.group_size})"
        return None

    def prepare(self, qt):
        return repack(qt)

    def restore(self, packed, spec, shape):
        return unpack(packed, spec, shape)

    def linear(self, x, packed, spec, shape, bias, act=None):
        return w4a16_matmul(x, packed, spec.group_size, bias)
