"""Dequantization of triton-w4a16 codes in registers (`@triton.jit` helpers shared by every kernel variant;
inlined where they are called, so they cost no call).

A code becomes a float without an integer-to-float conversion, in one of two ways:
  * float32 (`nibble_f32`, one nibble of a tile; `chunk_f32`, all eight at once): (word & (15 << 4·j)) |
    0x4B000000 read as a float32 is 2²³ + q·16^j, so one subtraction of 2²³ + z·16^j yields (q − z)·16^j exactly
    and the factor 16^j goes into the scale (or, in the GEMV, into x). Nibbles 0..4 are read in place (j = i),
    nibbles 5..7 from the word shifted right by 12 (j = i − 3), so each word costs a single shift.
  * float16 pairs (`f16x2_products`, `f16x2_weights`; float16 activations, groups of 64 or more; inline PTX on
    the GPU, the same operations emulated lane by lane under the interpreter): (word & 0x000F000F) | 0x64006400
    read as two float16 numbers is (1024 + q0, 1024 + q4) — nibbles 0 and 4, low half first —, (word &
    0x00F000F0) | 0x64006400 is (1024 + 16·q1, 1024 + 16·q5), and the same two masks on word >> 8 give nibbles
    2, 6 and 3, 7: one shift and four logic operations per word, then one float16x2 fma per pair gives (q − z)
    exactly (or (q − z)/16). The low halves hold nibbles 0..3 (input columns 0..63 of the chunk, one group when
    groups have 64 columns or more), the high halves nibbles 4..7 (columns 64..127).
"""

import triton
import triton.language as tl


# ------------------------------------------------------------------------------ scales and zero points ----
@triton.jit
def group_scales(s_ptr, g, N, offs_n, n_mask):
    """The scales of group g for the output features offs_n, float32 of offs_n's shape."""
    return tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)


@triton.jit
def group_zeros(z_ptr, g, N, offs_n, n_mask, SYMMETRIC: tl.constexpr):
    """The zero points of group g for the output features offs_n (8 for symmetric weights), as group_scales."""
    if SYMMETRIC:
        return tl.full(offs_n.shape, 8.0, tl.float32)
    else:
        return tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)


@triton.jit
def nibble_params(s_ptr, z_ptr, c, I: tl.constexpr, group_size, N, offs_n, n_mask, SYMMETRIC: tl.constexpr):
    """Scales and zero points ([BLOCK_N] float32) of the group that nibble I of chunk c (its input columns
    128 c + 16 I ..) belongs to."""
    g = (c * 128 + 16 * I) // group_size
    return group_scales(s_ptr, g, N, offs_n, n_mask), group_zeros(z_ptr, g, N, offs_n, n_mask, SYMMETRIC)


@triton.jit
def chunk_params(s_ptr, z_ptr, c, group_size, N, offs_n, n_mask, GROUP_NIBS: tl.constexpr,
                 SYMMETRIC: tl.constexpr):
    """Scales and zero points of chunk c as `chunk_f32` takes them: [1, 1, BLOCK_N] when the chunk lies in one
    group, else [8, 1, BLOCK_N] (one row per nibble); symmetric zero points are the number 8."""
    if GROUP_NIBS == 8:
        g = (c * 128) // group_size
        s3 = group_scales(s_ptr, g, N, offs_n, n_mask)[None, None, :]
        if SYMMETRIC:
            z3 = 8.0
        else:
            z3 = group_zeros(z_ptr, g, N, offs_n, n_mask, SYMMETRIC)[None, None, :]
    else:
        gi = ((c * 128 + 16 * tl.arange(0, 8)) // group_size)[:, None] * N + offs_n[None, :]
        s3 = tl.load(s_ptr + gi, mask=n_mask[None, :], other=0.0).to(tl.float32)[:, None, :]
        if SYMMETRIC:
            z3 = 8.0
        else:
            z3 = tl.load(z_ptr + gi, mask=n_mask[None, :], other=0.0).to(tl.float32)[:, None, :]
    return s3, z3


@triton.jit
def pair_groups(c, group_size, GROUP_NIBS: tl.constexpr, G128: tl.constexpr):
    """The groups of the low (columns 0..63) and high (64..127) halves of chunk c, groups of 64 or more."""
    if G128:
        g_lo = c
        g_hi = c
    elif GROUP_NIBS == 8:
        g_lo = (c * 128) // group_size
        g_hi = g_lo
    else:  # groups of 64: the two halves of the chunk
        g_lo = 2 * c
        g_hi = 2 * c + 1
    return g_lo, g_hi


# ----------------------------------------------------------------------------------------------- float32 ----
@triton.jit
def nibble_f32(p, p_hi, z, I: tl.constexpr):
    """Nibble I of the words p (uint32 [16, BLOCK_N]; p_hi = p >> 12) less the zero points z ([BLOCK_N]): returns
    (q − z)·16^j as float32 (exact) and the constant 16^−j that takes the factor out again."""
    if I < 5:
        word = p
    else:
        word = p_hi
    shift: tl.constexpr = 4 * (I - 3 * (I // 5))  # 4 j
    bits = (word & (15 << shift)) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - (z * (1 << shift) + 8388608.0)[None, :], 1.0 / (1 << shift)


@triton.jit
def chunk_f32(p, p_hi, s3, z3, dtype: tl.constexpr):
    """All 8 nibbles of the words p (uint32 [16, BLOCK_N]; p_hi = p >> 12) as Ŵ = (q − z)·s, a [128, BLOCK_N]
    tile of dtype whose row 16 i + r is nibble i of word row r (input column 16 i + r of the chunk); s3, z3 from
    `chunk_params`."""
    offs_i = tl.arange(0, 8)
    j = tl.where(offs_i < 5, offs_i, offs_i - 3)
    pow16 = tl.exp2((4 * j).to(tl.float32))[:, None, None]
    word = tl.where((offs_i < 5)[:, None, None], p[None, :, :], p_hi[None, :, :])
    bits = (word & (15 << (4 * j)).to(tl.uint32)[:, None, None]) | 0x4B000000
    q3 = bits.to(tl.float32, bitcast=True) - (z3 * pow16 + 8388608.0)  # (q − z)·16^j, exact
    return tl.reshape((q3 * (s3 / pow16)).to(dtype), [128, p.shape[1]])


# ----------------------------------------------------------------------------------------- float16 pairs ----
@triton.jit
def f16_bits(v):
    """v rounded to float16, its bits in the low half of int32 words (sign-extended)."""
    return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)


@triton.jit
def f16x2(lo, hi):
    """Two float tensors rounded to float16 and paired in int32 words, lo in the low half."""
    return (f16_bits(lo) & 0xFFFF) | (f16_bits(hi) << 16)


@triton.jit
def load_f16x2(ptr, OFFSET: tl.constexpr):
    """The float16 numbers at ptr and ptr + OFFSET paired in int32 words, the first in the low half."""
    # not f16x2(load, load): each number is converted right after its load, the H100-tuned instruction order
    return (f16_bits(tl.load(ptr)) & 0xFFFF) | (f16_bits(tl.load(ptr + OFFSET)) << 16)


@triton.jit
def addend_pairs(z_lo, z_hi, A: tl.constexpr, B: tl.constexpr, K: tl.constexpr):
    """The float16x2 addends −(A + z·K) and −(B + z·K), from the zero points of the low and high halves."""
    # all four halves before the pairs are formed: the H100-tuned instruction order
    a_lo = f16_bits(-A - z_lo * K) & 0xFFFF
    a_hi = f16_bits(-A - z_hi * K)
    b_lo = f16_bits(-B - z_lo * K) & 0xFFFF
    b_hi = f16_bits(-B - z_hi * K)
    return a_lo | (a_hi << 16), b_lo | (b_hi << 16)


@triton.jit
def halves(u):
    """The two float16 numbers of 32-bit words u (low half, high half), as float32 (interpreter emulation)."""
    u = u.to(tl.uint32, bitcast=True)
    return ((u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32),
            (u >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def code_pairs(p):
    """The four float16 pairs of the words p, as the PTX's lop3 makes them (interpreter emulation):
    1024 + q for nibbles (0, 4) and (2, 6), 1024 + 16 q for (1, 5) and (3, 7)."""
    u = p.to(tl.uint32, bitcast=True)
    u8 = u >> 8
    return ((u & 0x000F000F) | 0x64006400, (u & 0x00F000F0) | 0x64006400,
            (u8 & 0x000F000F) | 0x64006400, (u8 & 0x00F000F0) | 0x64006400)


@triton.jit
def pair_fma(t, k, z, x, h_lo, h_hi):
    """One float16x2 step of `f16x2_products`, emulated: h + (t·k + z)·x per half, rounded to float16."""
    t_lo, t_hi = halves(t)
    z_lo, z_hi = halves(z)
    x_lo, x_hi = halves(x)
    return (((t_lo * k + z_lo) * x_lo + h_lo).to(tl.float16).to(tl.float32),
            ((t_hi * k + z_hi) * x_hi + h_hi).to(tl.float16).to(tl.float32))


@triton.jit
def pair_weights(t, k, z, s):
    """One float16x2 step of `f16x2_weights`, emulated: (t·k + z)·s per half, as float16."""
    t_lo, t_hi = halves(t)
    z_lo, z_hi = halves(z)
    s_lo, s_hi = halves(s)
    return ((t_lo * k + z_lo) * s_lo).to(tl.float16), ((t_hi * k + z_hi) * s_hi).to(tl.float16)


def _decode_ptx(word: str, k_a: str, k_b: str, z_a: str, z_b: str) -> str:
    """PTX: the four code pairs t0..t3 of `word` (lop3 with 0xEA: (a & b) | c), then one float16x2 fma each:
    t0, t2 (1024 + q) times k_a plus z_a, t1, t3 (1024 + 16 q) times k_b plus z_b."""
    return f"""
            lop3.b32 t0, {word}, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 t1, {word}, 0x00F000F0, 0x64006400, 0xEA;
            shr.u32 u, {word}, 8;
            lop3.b32 t2, u, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 t3, u, 0x00F000F0, 0x64006400, 0xEA;
            fma.rn.f16x2 t0, t0, {k_a}, {z_a};
            fma.rn.f16x2 t1, t1, {k_b}, {z_b};
            fma.rn.f16x2 t2, t2, {k_a}, {z_a};
            fma.rn.f16x2 t3, t3, {k_b}, {z_b};"""


# f16x2_products: outputs $0, $1 (float32 sums of the low and high halves); inputs $2 the word, $3..$6 the x
# pairs, $7, $8 the addend pairs. k16 = 1/16 and k256 = 1/256 as float16x2.
PRODUCTS_PTX = tl.constexpr("""{
            .reg .b32 t0, t1, t2, t3, u, h, k16, k256;
            .reg .b16 hl, hh;
            mov.b32 k16, 0x2C002C00;
            mov.b32 k256, 0x1C001C00;""" + _decode_ptx("$2", "k16", "k256", "$7", "$8") + """
            mul.rn.f16x2 h, $3, t0;
            fma.rn.f16x2 h, $4, t1, h;
            fma.rn.f16x2 h, $5, t2, h;
            fma.rn.f16x2 h, $6, t3, h;
            mov.b32 {hl, hh}, h;
            cvt.f32.f16 $0, hl;
            cvt.f32.f16 $1, hh;
            }""")

# f16x2_weights: outputs $0..$7 (float16 tiles of nibbles 0..7); inputs $8 the word, $9 the scale pair, $10, $11
# the addend pairs. k1 = 1 and k16 = 1/16 as float16x2.
WEIGHTS_PTX = tl.constexpr("""{
            .reg .b32 t0, t1, t2, t3, u, k1, k16;
            mov.b32 k1, 0x3C003C00;
            mov.b32 k16, 0x2C002C00;""" + _decode_ptx("$8", "k1", "k16", "$10", "$11") + """
            mul.rn.f16x2 t0, t0, $9;
            mul.rn.f16x2 t1, t1, $9;
            mul.rn.f16x2 t2, t2, $9;
            mul.rn.f16x2 t3, t3, $9;
            mov.b32 {$0, $4}, t0;
            mov.b32 {$1, $5}, t1;
            mov.b32 {$2, $6}, t2;
            mov.b32 {$3, $7}, t3;
            }""")


@triton.jit
def f16x2_products(p, x0, x1, x2, x3, z_a, z_b, USE_ASM: tl.constexpr):
    """Σ (q − z)/16 · x over each word p's code pairs, in float16x2 (four products per half, |sum| < 4·max|x|);
    returns the sums of the low halves (nibbles 0..3) and of the high halves (4..7) as float32.

    x_j: the x pairs (column 16 j + r, column 64 + 16 j + r) as float16x2 words; z_a, z_b: the addend pairs
    −(64 + z/16) (for 1024 + q scaled by 1/16) and −(4 + z/16) (for 1024 + 16 q scaled by 1/256)."""
    if USE_ASM:
        h_lo, h_hi = tl.inline_asm_elementwise(
            PRODUCTS_PTX,
            "=f,=f,r,r,r,r,r,r,r", [p, x0, x1, x2, x3, z_a, z_b],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:  # the same operations, one float16 lane at a time (Triton's interpreter runs no assembly)
        t0, t1, t2, t3 = code_pairs(p)
        h_lo, h_hi = pair_fma(t0, 0.0625, z_a, x0, 0.0, 0.0)
        h_lo, h_hi = pair_fma(t1, 0.00390625, z_b, x1, h_lo, h_hi)
        h_lo, h_hi = pair_fma(t2, 0.0625, z_a, x2, h_lo, h_hi)
        h_lo, h_hi = pair_fma(t3, 0.00390625, z_b, x3, h_lo, h_hi)
    return h_lo, h_hi


@triton.jit
def f16x2_weights(p, s_pair, z_a, z_b, USE_ASM: tl.constexpr):
    """Ŵ = (q − z)·s of the 8 nibbles of each word p, computed on float16 pairs: returns 8 float16 tiles, tile i
    the [16, BLOCK_N] block of nibble i (input columns 16 i .. 16 i + 15 of the chunk).

    s_pair: the scales of the low and high halves as float16x2 words; z_a, z_b: the addend pairs −(1024 + z)
    (for 1024 + q) and −(64 + z) (for 1024 + 16 q scaled by 1/16)."""
    if USE_ASM:
        w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
            WEIGHTS_PTX,
            "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r", [p.to(tl.int32, bitcast=True), s_pair, z_a, z_b],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                   tl.float16), is_pure=True, pack=1)
    else:  # the same operations, one float16 lane at a time
        t0, t1, t2, t3 = code_pairs(p)
        w0, w4 = pair_weights(t0, 1.0, z_a, s_pair)
        w1, w5 = pair_weights(t1, 0.0625, z_b, s_pair)
        w2, w6 = pair_weights(t2, 1.0, z_a, s_pair)
        w3, w7 = pair_weights(t3, 0.0625, z_b, s_pair)
    return w0, w1, w2, w3, w4, w5, w6, w7
