// lowbit's native CPU matmuls for integer weights: y = x · Wᵀ with W = (q − z) · s per group.
//   int4_gemm: codes of 2 to 4 bits, two per byte in the chunked layout below.
//   int8_gemm: signed 8-bit codes, one per byte (codes of 2-3 or 5-7 bits may be packed to their width).
//
// Why a kernel of our own: with one row of activations (decode) PyTorch's packed kernels read the weights well
// below memory speed, and its int4 layout needs out_features % 16 == 0 and a second copy for grouped int8.
// Here the work per weight is a few vector instructions on tiles of 4 output rows
// (benchmarks/cpu_kernels.py measures both on the default model's shapes).
//
// int4 layout (written by lowbit.kernels.native_int4, documented there too):
//   wpack   uint8 [N, K/2]: each row in chunks of 64 columns (32 bytes); byte j of chunk c holds the code of
//           column 64c + j in its low nibble and of column 64c + 32 + j in its high nibble, so that one
//           32-byte load yields two vectors of 32 consecutive columns each. K must be a multiple of 64. The rows
//           are stored in blocks of four (see "Rows in blocks of four").
//   scales  [N, G], G = K / group_size, group_size a multiple of 32 dividing K.
//   offsets [N, G]: z · s, so that (q − z) · s = q · s − offset.
//   Scales and offsets are float32, or float16 / bfloat16 where their values are exact in it (the caller
//   decides; see Scales16 below), or GGUF k-quants' sub-block codes with 16-bit super-block scales (every op's
//   optional scale_super / offset_super; see "Two-level scales"): resident bytes then stay near the stored ones,
//   and the loops are unchanged.
// Then  y[m, n] = Σ_g s[n, g] · Σ_{k∈g} q[n, k] · x[m, k]  −  Σ_g offset[n, g] · Σ_{k∈g} x[m, k].
//
// Arithmetic: activations are rounded to bfloat16 (as PyTorch's packed kernels do), every product and sum is
// float32. The codes are small integers, exact in bfloat16. The order of the float32 sums differs between the
// instruction-set paths, so they agree to float32 rounding, not bit for bit; each path is deterministic (and
// independent of the thread count: every output is summed by one thread in a fixed order).
//
// int8: wq int8 [N, K] (rows in blocks of four, as int4's), K a multiple of 32, groups as above (per channel: one
// group of K); offsets z · s. Codes of 2-3 or 5-7 bits may instead be packed to their width (uint8 wq, rows in
// blocks of four by steps of one packed chunk; see "2-, 3- and 5- to 7-bit codes, packed" below).
//
// int4_gemm_q8 / int8_gemm_q8 (decode where the CPU has AVX-512 VNNI or AVX2, cpu_q8 tells which): the same
// layouts, with the activations rounded to int8 per block and integer dot products (cpu_gemm_q8.inc documents the
// math, cpu_gemm_q8_avx2.inc how AVX2 does without vpdpbusd; `level` forces one, for tests).
// int4pack_dense_linear: prefill for PyTorch's own int4 layout (documented where it is defined, below).
// int4_dense_linear / int8_dense_linear (prefill): the weight dequantized a tile at a time and multiplied by ATen;
// for bfloat16 activations on CPUs with AMX-BF16, dequantized into AMX tiles instead and multiplied there
// (cpu_gemm_amx.inc; cpu_amx tells whether, LOWBIT_NATIVE_AMX=0 turns it off).
//
// Paths, chosen at run time by what the CPU has (cpu_isa tells which; `isa` forces one, for tests):
//   3  AVX-512 BF16: int4 codes → bfloat16 (128 + q, by one OR), 32 products per vdpbf16ps; only when asked for
//      (see int4_gemm); int8 as path 2 (widening int8 to bfloat16 costs more instructions than it saves).
//   2  AVX-512F/BW: codes → float32, 16 products per FMA.
//   1  AVX2 + FMA: codes → float32, 8 products per FMA.
//   0  portable C++.
// The inner loops (cpu_gemm_tiles.inc) are written once and expanded per instruction set.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kChunk = 64;   // int4: columns per 32-byte chunk
// Every path reads the weight rows this many rows ahead with software prefetches: from memory (weights larger
// than the caches, as in decoding) the hardware prefetchers alone left the kernels waiting (the VNNI path read
// 13 GB/s from memory without them, 20 with them, on an Intel Xeon whose plain reads reach 29).
constexpr int64_t kPrefetch = 16;

struct Problem {
  const uint16_t* xb;   // [M, K] bfloat16 bits
  const float* xf;      // [M, K] the same values as float32
  const float* xsum;    // [M, G] Σ x over each group (of the bfloat16 values, in float32)
  const uint8_t* w;     // int4: [N, K/2] chunked; int8: [N, K] int8
  const float* s;       // [N, G]
  const float* off;     // [N, G]
  float* y;             // [M, N]
  int64_t M, N, K, G, gs;
  int bits = 0;         // int8 decode on int8 activations: 2-3/5-7-bit codes read packed (rows of row_bytes)
  int64_t row_bytes = 0;
  int64_t row0 = 0;     // the weight row w starts at (a multiple of 4, see "Rows in blocks of four"): the last
                        // block's size is read from N − row0
  bool blocked = true;  // w in blocks of four rows; false: row-major (unpacked or copied by over_rows)
};

// ---- Rows in blocks of four --------------------------------------------------------------------------------------
// Byte-wide weights (int4 wpack, int8 codes of a byte each) are resident in blocks of four rows, each block stored
// step by step: bytes 0-63 of its row 0, of row 1, row 2, row 3, then bytes 64-127 of each, and so on; a last step
// of 32 bytes (int4 with K % 128 == 64, int8 with K % 64 == 32) likewise, 32 bytes of each row. Where N % 4 != 0
// the last block holds the N % 4 remaining rows the same way. The tensor keeps its shape [N, row bytes]; within a
// row nothing moves (the int4 chunks stay as documented above). Packed 2-3/5-7-bit codes are stored the same way by
// steps of their own width (see "2-, 3- and 5- to 7-bit codes, packed").
// Why: the decode loops read four rows at once, 64 bytes of each per step; stored so, a thread reads one
// sequential stream instead of four, 256 bytes apart per step. On an AMD EPYC Zen 4 (30 GB/s) whose hardware
// prefetchers followed four streams poorly, the same loops read 1.3-2x faster (BENCHMARKS.md). llama.cpp's x86
// repacking of Q4_0 (rows interleaved by eight) is the same idea.
// The decode loops read this layout directly (step_at in the .inc files, byte_at in cpu_gemm_tiles.inc), and so
// does the AVX-512 int4 dequantization of the dense path (byte_at); the other dense paths (dequantizing for
// prefill) copy a run of rows back to row-major into the thread's buffer first (over_rows), as packed codes are
// unpacked.

// `bytes` of a buffer kept by the caller (thread_local: no fresh pages per call), from its first 64-byte boundary.
inline void* aligned64(std::vector<uint8_t>& buf, size_t bytes) {
  buf.resize(bytes + 64);
  return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
}

// The offset of byte j of row r in a weight of `rows` rows of rb bytes each, stored as above.
inline int64_t block_offset(int64_t rows, int64_t rb, int64_t r, int64_t j) {
  const int64_t r0 = r & ~int64_t(3), t = std::min<int64_t>(4, rows - r0), c = j / 64;
  const int64_t width = std::min<int64_t>(64, rb - c * 64);
  return r0 * rb + c * 64 * t + (r - r0) * width + j % 64;
}

// Rows r0 .. r0 + count of such a weight, row-major into dst [count, rb] (rb a multiple of 32).
void rows_from_blocks(const uint8_t* w, int64_t rows, int64_t rb, int64_t r0, int64_t count, uint8_t* dst) {
  const int64_t full = rb / 64 * 64;
  for (int64_t r = r0; r < r0 + count; ++r) {
    uint8_t* out = dst + (r - r0) * rb;
    for (int64_t j = 0; j < full; j += 64) std::memcpy(out + j, w + block_offset(rows, rb, r, j), 64);
    if (full < rb) std::memcpy(out + full, w + block_offset(rows, rb, r, full), 32);
  }
}

// Byte j of row n + i, for a tile of NR rows from row n (NR == 4 tiles start at a multiple of 4 and so are one
// whole block), where p's weight is stored in blocks, or row-major (!p.blocked).
template <int NR>
inline const uint8_t* byte_at(const Problem& p, int64_t rb, int64_t n, int i, int64_t j) {
  if (!p.blocked) return p.w + (n + i) * rb + j;
  if constexpr (NR == 4) {
    const int64_t c = j / 64;
    return p.w + n * rb + c * 256 + i * std::min<int64_t>(64, rb - c * 64) + j % 64;
  } else {
    return p.w + block_offset(p.N - p.row0, rb, n + i, j);
  }
}

// Step c (bytes 64c .. 64c + 63, or the last 32 where !Full) of row n + i, in a tile of NR rows from row n; NR == 4
// tiles start at a multiple of 4 (the callers' partition), so they are one whole block.
template <int NR, bool Full>
inline const uint8_t* step_at(const Problem& p, int64_t rb, int64_t n, int i, int64_t c) {
  if constexpr (NR == 4) return p.w + n * rb + c * 256 + i * (Full ? 64 : 32);
  else return p.w + block_offset(p.N - p.row0, rb, n + i, c * 64);
}

// Output rows n .. n+nr−1 of activation row m: out[i] holds Σ_g s · Σ q·x; the offset term is subtracted here.
inline void finish(const Problem& p, int64_t n, int64_t m, int nr, const float* out) {
  const float* xs = p.xsum + m * p.G;
  for (int i = 0; i < nr; ++i) {
    const float* off = p.off + (n + i) * p.G;
    float o = 0.f;
    for (int64_t g = 0; g < p.G; ++g) o += off[g] * xs[g];
    p.y[m * p.N + n + i] = out[i] - o;
  }
}


// ---- 16-bit scales ----------------------------------------------------------------------------------------------
// Scales and offsets may be resident as float16 or bfloat16 (lowbit.kernels.native_int4 keeps them so where every
// value is exact in it: GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 store float16 scales, symmetric integer formats 16-bit
// ones), the offsets of symmetric formats as one number c (every offset is c times its scale; see check_scales).
// The row loops read float32: each run of kWidenRows rows has its scales and offsets widened (or c · s computed)
// into a buffer of the thread's (in L1) just before those rows are computed. The widening is exact, so results
// equal those of float32 scales bit for bit, while the resident bytes are the stored ones.
// Measured on the default model's shapes (Intel Xeon with AMX): runs of 64 rows with the next run's scales
// prefetched while a run computes are as fast as float32 scales within this machine's noise (±5%); without the
// prefetch, reading each run's scales as a burst at its start was 5-10% slower.
constexpr int64_t kWidenRows = 64;

struct Scales16 {
  const uint16_t* s = nullptr;     // [N, G] float16 or bfloat16 bits; null: the Problem's float32 scales are read
                                   // (unless s_super is set)
  const uint16_t* off = nullptr;   // [N, G] the same; null: see zeros, else every offset is `per_scale` · its scale
  const uint8_t* zeros = nullptr;  // [N, G] zero points: every offset is its zero point times its scale (with
                                   // off_super: the codes m of offsets dmin · m)
  bool bf16 = false;
  float per_scale = 0.f;
  // Two-level scales (GGUF's k-quants, see "Two-level scales" below): scale = d · code, d 16-bit per super-block
  const uint16_t* s_super = nullptr;    // [N, G / per_super] d; set: `codes` hold the groups' scale codes
  const int8_t* codes = nullptr;        // [N, G] int8, or uint8 where codes_unsigned
  bool codes_unsigned = false;
  const uint16_t* off_super = nullptr;  // [N, G / per_super] dmin: offsets dmin · m, m in `zeros`
  int64_t per_super = 0;                // groups per super-block
  bool widened() const { return s != nullptr || s_super != nullptr; }
};

inline float widen_one(uint16_t bits, bool bf16) {
  return bf16 ? static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()))
              : static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

#pragma GCC push_options
#pragma GCC target("avx512f")
void widen_avx512(const uint16_t* in, float* out, int64_t count, bool bf16, float times) {
  int64_t i = 0;
  const __m512 t = _mm512_set1_ps(times);
  for (; i + 16 <= count; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(t, bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                                    : _mm512_cvtph_ps(h)));
  }
  for (; i < count; ++i) out[i] = times * widen_one(in[i], bf16);
}
#pragma GCC target("avx2,f16c")
void widen_avx2(const uint16_t* in, float* out, int64_t count, bool bf16, float times) {
  int64_t i = 0;
  const __m256 t = _mm256_set1_ps(times);
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(t, bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                                    : _mm256_cvtph_ps(h)));
  }
  for (; i < count; ++i) out[i] = times * widen_one(in[i], bf16);
}
#pragma GCC pop_options

// out = times · in, float32 (exact: times is 1, 0 or a power of two)
void widen(const uint16_t* in, float* out, int64_t count, bool bf16, float times = 1.f) {
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return 1;
    return 0;
  }();
  if (level == 2) return widen_avx512(in, out, count, bf16, times);
  if (level == 1) return widen_avx2(in, out, count, bf16, times);
  for (int64_t i = 0; i < count; ++i) out[i] = times * widen_one(in[i], bf16);
}

// ---- Two-level scales ------------------------------------------------------------------------------------------
// GGUF's k-quants store a group's (sub-block's) scale as a small integer code times a 16-bit scale d per super-block
// of 256 columns (Q2_K, Q4_K and Q5_K likewise their offsets, dmin · m). Their float32 products are exact (an 11-bit
// significand times a code of at most 8 bits), so the kernels take the stored pieces and form d · code as they widen
// a run's scales: the results are those of the float32 products bit for bit, and the resident bytes are the
// stored ones but for the codes, a byte each where the file packs them to 4 or 6 bits.
//   scales     int8 or uint8 [N, G]: the codes;      scale_super  float16 / bfloat16 [N, S], G % S == 0: d;
//   offsets    float32 [1] c (offset = c · scale, as above), or uint8 [N, G] codes m with
//              offset_super [N, S] (the scale_super's dtype): offset = dmin · m, or without offset_super uint8
//              [N, G] zero points z: offset = z · scale (lowbit's asymmetric two-level integer formats).
// out[j·per + i] = d[j] · code[j·per + i] for `supers` super-blocks of `per` groups (plain loops, vectorized per
// instruction set; a division per group to find its super-block made a decode call 3x slower, and an inner loop
// of a run-time 8 was left scalar: the k-quants' 8 and 16 groups per super-block are compile-time counts here)
template <int64_t Per, class Code>
__attribute__((target_clones("avx512f", "avx2", "default")))
void times_codes_of(const float* d, const Code* code, int64_t supers, int64_t per, float* out) {
  const int64_t n = Per ? Per : per;
  for (int64_t j = 0; j < supers; ++j)
    for (int64_t i = 0; i < n; ++i) out[j * n + i] = d[j] * static_cast<float>(code[j * n + i]);
}

#pragma GCC push_options
#pragma GCC target("avx512f")
// 16 groups per step: one super-block's scale (per 16) or two (per 8) against 16 codes widened to float32
template <int64_t Per, class Code>
void times_codes_avx512(const float* d, const Code* code, int64_t supers, float* out) {
  const int64_t n = supers * Per;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i c8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(code + i));
    const __m512i c = std::is_same_v<Code, uint8_t> ? _mm512_cvtepu8_epi32(c8) : _mm512_cvtepi8_epi32(c8);
    const __m512 dv = Per == 16 ? _mm512_set1_ps(d[i / 16])
                                : _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(d[i / 8])),
                                                                      _mm256_castps_pd(_mm256_set1_ps(d[i / 8 + 1])), 1));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(dv, _mm512_cvtepi32_ps(c)));
  }
  for (; i < n; ++i) out[i] = d[i / Per] * static_cast<float>(code[i]);
}
#pragma GCC pop_options

template <class Code>
void times_codes(const float* d, const Code* code, int64_t supers, int64_t per, float* out) {
  static const bool avx512 = [] { __builtin_cpu_init(); return __builtin_cpu_supports("avx512f"); }();
  if (avx512 && per == 8) return times_codes_avx512<8>(d, code, supers, out);
  if (avx512 && per == 16) return times_codes_avx512<16>(d, code, supers, out);
  if (per == 8) return times_codes_of<8>(d, code, supers, per, out);
  if (per == 16) return times_codes_of<16>(d, code, supers, per, out);
  times_codes_of<0>(d, code, supers, per, out);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void times_scalar(float c, const float* in, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = c * in[i];
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void times_zero_points(const uint8_t* z, const float* in, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(z[i]) * in[i];
}

// Rows a .. a + rows of h's scales and offsets as float32 into s and off ([rows, G] each): one-level 16-bit ones
// widened, two-level ones formed as d · code.
void widen_scales(const Scales16& h, int64_t a, int64_t rows, int64_t G, float* s, float* off) {
  if (h.s_super == nullptr) {
    widen(h.s + a * G, s, rows * G, h.bf16);
    if (h.off != nullptr) widen(h.off + a * G, off, rows * G, h.bf16);
    else if (h.zeros != nullptr) times_zero_points(h.zeros + a * G, s, rows * G, off);   // exact: 16-bit s times a byte
    else widen(h.s + a * G, off, rows * G, h.bf16, h.per_scale);
    return;
  }
  const int64_t S = G / h.per_super;
  thread_local std::vector<float> super;
  super.resize(static_cast<size_t>(rows * S));
  widen(h.s_super + a * S, super.data(), rows * S, h.bf16);
  if (h.codes_unsigned)
    times_codes(super.data(), reinterpret_cast<const uint8_t*>(h.codes) + a * G, rows * S, h.per_super, s);
  else
    times_codes(super.data(), h.codes + a * G, rows * S, h.per_super, s);
  if (h.off_super != nullptr) {
    widen(h.off_super + a * S, super.data(), rows * S, h.bf16);
    times_codes(super.data(), h.zeros + a * G, rows * S, h.per_super, off);
  } else if (h.zeros != nullptr) {
    // z · s rounds once, as the float32 offsets it stands for were computed (lowbit's asymmetric two-level formats)
    times_zero_points(h.zeros + a * G, s, rows * G, off);
  } else {
    times_scalar(h.per_scale, s, rows * G, off);   // exact: c is 0 or a power of two
  }
}

// Rows from .. from + rows of every piece h reads, into L1: the next run's, while this run computes (read as a burst
// at its start they would wait on memory)
void prefetch_scales(const Scales16& h, int64_t from, int64_t rows, int64_t G) {
  const auto fetch = [](const void* at, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(static_cast<const char*>(at) + i, _MM_HINT_T0);
  };
  const int64_t S = h.s_super != nullptr ? G / h.per_super : 0;
  if (h.s != nullptr) fetch(h.s + from * G, rows * G * 2);
  if (h.off != nullptr) fetch(h.off + from * G, rows * G * 2);
  if (h.zeros != nullptr) fetch(h.zeros + from * G, rows * G);
  if (h.codes != nullptr) fetch(h.codes + from * G, rows * G);
  if (h.s_super != nullptr) fetch(h.s_super + from * S, rows * S * 2);
  if (h.off_super != nullptr) fetch(h.off_super + from * S, rows * S * 2);
}

// ---- 2-, 3- and 5- to 7-bit codes, packed ------------------------------------------------------------------------
// int8_gemm / int8_gemm_q8 also take codes of b = 2, 3, 5, 6 or 7 bits (values 0 .. 2^b − 1) packed to b bits each,
// as a uint8 wq (lowbit.kernels.native_int8 writes it), K a multiple of 64. A row is K/64 steps of S bytes, one per
// chunk c of 64 columns:
//   b = 5-7: S = 32 + 8 · (b − 4): the chunk's low nibbles as the int4 layout holds them (byte j: column 64c + j in
//            the low nibble, 64c + 32 + j in the high one), then b − 4 masks of 8 bytes (little-endian 64-bit):
//            bit i of mask j is bit 4 + j of the code of column 64c + i;
//   b = 2-3: S = 8 · b: the masks alone, bit i of mask j being bit j of the code of column 64c + i (GGUF's Q2_K
//            and Q3_K, whose 16-column sub-blocks run here).
// So wq is [N, S · K/64] = [N, K/2 + (b − 4) · K/8] or [N, b · K/8], and the rows are stored in blocks of four as
// byte-wide codes are (see "Rows in blocks of four"), with steps of S bytes instead of 64: the S bytes of chunk 0
// of each of the block's rows, then chunk 1 of each, and so on (packed_offset). Why: the decode loop reads four
// rows' chunk c at once; laid out so, that is one run of 4 · S bytes, the same single stream as the byte-wide
// layouts (where each row held its nibbles and then its masks, a four-row tile read eight streams).
// The decode loop on int8 activations (cpu_gemm_q8.inc) rebuilds each step's 64 code bytes in registers
// (packed_chunk); the other row loops and the dense path read bytes, each run of kWidenRows rows unpacked into a
// buffer of the thread's (L2-resident: 64 rows of K bytes) just before it is computed, as 16-bit scales are
// widened. Either way the loops see the same code bytes: the float paths give the results of the codes unpacked,
// bit for bit, and the int8-activation decode the same integer products (it multiplies the packed codes as the
// unsigned bytes they are, where byte codes are shifted by 128 and the shift taken back afterwards, so its float32
// sums cancel less), while the resident bytes are the stored ones (b bits per weight, not 8).

constexpr int plane_bit(int bits) { return bits > 4 ? 4 : 0; }          // the code bit held by a chunk's first mask
constexpr int plane_count(int bits) { return bits - plane_bit(bits); }  // masks per chunk of 64 columns
constexpr int nibble_bytes(int bits) { return bits > 4 ? 32 : 0; }      // where a chunk's masks start
constexpr int64_t packed_step(int bits) { return nibble_bytes(bits) + 8 * plane_count(bits); }   // S

// The offset of chunk c of row r in a packed weight of `rows` rows of rb bytes, in blocks of four with steps of S.
inline int64_t packed_offset(int64_t rows, int64_t rb, int64_t S, int64_t r, int64_t c) {
  const int64_t r0 = r & ~int64_t(3), t = std::min<int64_t>(4, rows - r0);
  return r0 * rb + (c * t + (r - r0)) * S;
}

inline int packed_bits(int64_t row_bytes, int64_t K) {   // b for a packed row of row_bytes, 0 where it is not one
  if (K % kChunk) return 0;
  if (row_bytes == 2 * (K / 8) || row_bytes == 3 * (K / 8)) return static_cast<int>(row_bytes / (K / 8));
  const int64_t extra = row_bytes - K / 2;
  if (extra <= 0 || extra % (K / 8)) return 0;
  const int64_t b = 4 + extra / (K / 8);
  return b >= 5 && b <= 7 ? static_cast<int>(b) : 0;
}

// The 64 codes of one chunk (its S bytes at `chunk`) into dst, one byte each.
void unpack_chunk_portable(const uint8_t* chunk, int8_t* dst, int bits) {
  if (bits > 4)
    for (int j = 0; j < 32; ++j) {
      dst[j] = static_cast<int8_t>(chunk[j] & 15);
      dst[32 + j] = static_cast<int8_t>(chunk[j] >> 4);
    }
  else
    std::memset(dst, 0, kChunk);
  const int count = plane_count(bits), low = plane_bit(bits);
  for (int j = 0; j < count; ++j) {
    uint64_t m;
    std::memcpy(&m, chunk + nibble_bytes(bits) + j * 8, 8);
    for (int i = 0; i < 64; ++i) dst[i] = static_cast<int8_t>(dst[i] | (((m >> i) & 1) << (low + j)));
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
// The 64 code bytes of one chunk (its S bytes at `chunk`): for 5-7 bits one 32-byte load gives the low nibbles of
// both halves (for 2-3 bits they start at 0), then each mask adds its bit's value to its columns (those bits are
// clear, so + is |).
inline __m512i packed_chunk(const uint8_t* chunk, int bits) {
  __m512i v = _mm512_setzero_si512();
  if (bits > 4) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
    const __m256i low = _mm256_set1_epi8(15);
    v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low)),
                           _mm256_and_si256(_mm256_srli_epi16(b, 4), low), 1);
  }
  const int count = plane_count(bits), low_bit = plane_bit(bits);
  const uint8_t* planes = chunk + nibble_bytes(bits);
  for (int j = 0; j < count; ++j) {
    uint64_t m;
    std::memcpy(&m, planes + j * 8, 8);
    v = _mm512_mask_add_epi8(v, static_cast<__mmask64>(m), v,
                             _mm512_set1_epi8(static_cast<char>(1 << (low_bit + j))));
  }
  return v;
}

void unpack_chunk_avx512(const uint8_t* chunk, int8_t* dst, int bits) {
  _mm512_storeu_si512(dst, packed_chunk(chunk, bits));
}
#pragma GCC pop_options

// Rows r0 .. r0 + count of a packed weight w of `rows` rows of rb bytes (as stored: blocks of four) unpacked to
// row-major int8 [count, K] at dst; `portable` forces the plain loop (for tests: the AVX-512 one is taken wherever
// the CPU has it).
void unpack_rows(const uint8_t* w, int64_t rows, int64_t rb, int64_t r0, int64_t count, int8_t* dst, int64_t K,
                 int bits, bool portable = false) {
  static const bool has_avx512 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  }();
  const bool avx512 = has_avx512 && !portable;
  const int64_t S = packed_step(bits);
  for (int64_t r = r0; r < r0 + count; ++r)
    for (int64_t c = 0; c < K / kChunk; ++c) {
      const uint8_t* chunk = w + packed_offset(rows, rb, S, r, c);
      int8_t* out = dst + (r - r0) * K + c * kChunk;
      if (avx512) unpack_chunk_avx512(chunk, out, bits);
      else unpack_chunk_portable(chunk, out, bits);
    }
}

// Chunk c of row n + i of p's packed weight, in a tile of NR rows from row n (NR == 4 tiles are one whole block).
template <int NR, int Bits>
inline const uint8_t* packed_at(const Problem& p, int64_t n, int i, int64_t c) {
  constexpr int64_t S = packed_step(Bits);
  if constexpr (NR == 4) return p.w + n * p.row_bytes + (c * 4 + i) * S;
  else return p.w + packed_offset(p.N - p.row0, p.row_bytes, S, n + i, c);
}

// fn(q, r0, r1, base) over rows n0..n1 of p: with float32 scales and the weight read as stored (`row_major` false)
// once, as fn(p, n0, n1, 0); else per run of kWidenRows rows, as fn(q, 0, rows, a) where q is p restricted to rows
// a .. a + rows: weights from row a as stored (n0 a multiple of 4, see "Rows in blocks of four"), or with
// `row_major` copied to row-major (byte-wide codes) or unpacked (packed codes, `bits` 2-3, 5-7) into the thread's
// buffer; scales and offsets from row a, or widened into the thread's buffer; outputs from column a. `row_bytes`
// is one weight row.
template <class Fn>
void over_rows(const Problem& p, const Scales16& h, int64_t row_bytes, int64_t n0, int64_t n1, Fn fn, int bits = 0,
               bool row_major = false) {
  if (!h.widened() && !row_major) return fn(p, n0, n1, int64_t(0));
  thread_local std::vector<float> buf;
  thread_local std::vector<int8_t> codes;
  if (h.widened()) buf.resize(static_cast<size_t>(2 * kWidenRows * p.G));
  if (row_major) codes.resize(static_cast<size_t>(kWidenRows * std::max(p.K, row_bytes)));
  float* s = buf.data();
  float* off = s + kWidenRows * p.G;
  for (int64_t a = n0; a < n1; a += kWidenRows) {
    const int64_t rows = std::min(n1, a + kWidenRows) - a;
    Problem q = p;
    q.w = p.w + a * row_bytes;
    q.row0 = p.row0 + a;
    q.y = p.y == nullptr ? nullptr : p.y + a;
    if (row_major) {
      uint8_t* dst = reinterpret_cast<uint8_t*>(codes.data());
      if (bits != 0) unpack_rows(p.w, p.N - p.row0, row_bytes, a, rows, codes.data(), p.K, bits);
      else rows_from_blocks(p.w, p.N - p.row0, row_bytes, a, rows, dst);
      q.w = dst;
      q.blocked = false;
    }
    if (!h.widened()) {
      q.s = p.s + a * p.G;
      q.off = p.off + a * p.G;
      fn(q, int64_t(0), rows, a);
      continue;
    }
    widen_scales(h, a, rows, p.G, s, off);
    prefetch_scales(h, a + rows, std::min(n1, a + 2 * kWidenRows) - (a + rows), p.G);
    q.s = s;
    q.off = off;
    fn(q, int64_t(0), rows, a);
  }
}

// ---- portable C++ -------------------------------------------------------------------------------------------

namespace portable {
void int4_rows(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.xf + m * p.K;
      float total = 0.f;
      for (int64_t g = 0; g < p.G; ++g) {
        float dot = 0.f;
        for (int64_t k = g * p.gs; k < (g + 1) * p.gs; ++k) {
          const int64_t j = k % kChunk;
          const uint8_t b = *byte_at<1>(p, p.K / 2, n, 0, (k / kChunk) * 32 + (j & 31));
          dot += static_cast<float>(j < 32 ? (b & 15) : (b >> 4)) * x[k];
        }
        total += p.s[n * p.G + g] * dot;
      }
      finish(p, n, m, 1, &total);
    }
}

void int8_rows(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.xf + m * p.K;
      float total = 0.f;
      for (int64_t g = 0; g < p.G; ++g) {
        float dot = 0.f;
        for (int64_t k = g * p.gs; k < (g + 1) * p.gs; ++k)
          dot += static_cast<float>(static_cast<int8_t>(*byte_at<1>(p, p.K, n, 0, k))) * x[k];
        total += p.s[n * p.G + g] * dot;
      }
      finish(p, n, m, 1, &total);
    }
}
}  // namespace portable

// ---- AVX2 + FMA -----------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
inline float reduce8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
inline __m256i codes8(const uint8_t* b) {   // 8 bytes → 8 int32 lanes
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
}
#define VEC __m256
#define VZERO() _mm256_setzero_ps()
#define VSET1(f) _mm256_set1_ps(f)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VREDUCE(v) reduce8(v)
#define XROW(p, m) ((p).xf + (m) * (p).K)
#define CODE_BIAS 0.f
#define INT4_HALVES(bytes, x, lo, hi)                                                                   \
  for (int j = 0; j < 32; j += 8) {                                                                     \
    const __m256i v = codes8((bytes) + j);                                                              \
    lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))),                 \
                         _mm256_loadu_ps((x) + j), lo);                                                 \
    hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps((x) + 32 + j), hi); \
  }
#define INT8_STEP(w, x, acc)                                                                            \
  for (int j = 0; j < 32; j += 8)                                                                       \
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(                                       \
                              _mm_loadl_epi64(reinterpret_cast<const __m128i*>((w) + j)))),            \
                          _mm256_loadu_ps((x) + j), acc);
#include "cpu_gemm_tiles.inc"
#undef VEC
#undef VZERO
#undef VSET1
#undef VADD
#undef VFMA
#undef VREDUCE
#undef XROW
#undef INT4_HALVES
#undef INT8_STEP
#undef CODE_BIAS
}  // namespace avx2
#pragma GCC pop_options

// ---- AVX-512F/BW ----------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
namespace avx512 {
#define VEC __m512
#define VZERO() _mm512_setzero_ps()
#define VSET1(f) _mm512_set1_ps(f)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VREDUCE(v) _mm512_reduce_add_ps(v)
#define XROW(p, m) ((p).xf + (m) * (p).K)
#define CODE_BIAS 0.f
#define INT4_HALVES(bytes, x, lo, hi)                                                                   \
  for (int j = 0; j < 32; j += 16) {                                                                    \
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>((bytes) + j))); \
    lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))),                 \
                         _mm512_loadu_ps((x) + j), lo);                                                 \
    hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps((x) + 32 + j), hi); \
  }
#define INT8_STEP(w, x, acc)                                                                            \
  for (int j = 0; j < 32; j += 16)                                                                      \
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(                                       \
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>((w) + j)))),            \
                          _mm512_loadu_ps((x) + j), acc);
#include "cpu_gemm_tiles.inc"
#undef INT4_HALVES
#undef INT8_STEP
#undef XROW
#undef CODE_BIAS

// The dense path's int4 dequantization, by table: a group's 16 values q · s − offset (q = 0..15) are computed
// once per group in float32, a product then a difference as the scalar formula computes them, and each code picks
// its value with one permute (16 lanes of float32, or 32 of bfloat16), so the result is the formula's bit
// for bit. The weight is read as stored (blocks of four rows, or row-major where !p.blocked), not copied first.
// Measured (Intel Xeon with AMX, 2 threads, BENCHMARKS.md): the prefill op on a 1536x576 weight at one row of
// activations (the dequantization, mostly) 167-171 µs computing every value (conversion, product, difference, a
// call per 16 values to round them) from codes first copied to row-major, 112-119 µs so.
inline __m512 group_values(float s, float off) {
  const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_sub_ps(_mm512_mul_ps(q, _mm512_set1_ps(s)), _mm512_set1_ps(off));
}

// Rows n0..n1: for each 32-byte chunk c of row n, emit(n · K + 64c, chunk, low table, high table), the tables
// make(group_values(...)) of the groups of the chunk's low and high halves (different only for groups of 32, or
// of an odd multiple of 32), made once per group where groups are whole chunks.
template <class Table, class Make, class Emit>
inline void dequant_rows(const Problem& p, int64_t n0, int64_t n1, Make make, Emit emit) {
  const int64_t chunks = p.K / kChunk, per = p.gs / kChunk;
  for (int64_t n = n0; n < n1; ++n) {
    const float *s = p.s + n * p.G, *off = p.off + n * p.G;
    const auto chunk = [&](int64_t c) { return byte_at<1>(p, p.K / 2, n, 0, c * 32); };   // as stored
    if (p.gs % kChunk == 0) {
      for (int64_t g = 0, c = 0; g < p.G; ++g) {
        const Table t = make(group_values(s[g], off[g]));
        for (const int64_t end = c + per; c < end; ++c) emit(n * p.K + c * kChunk, chunk(c), t, t);
      }
    } else if (p.gs == 32) {
      for (int64_t c = 0; c < chunks; ++c)
        emit(n * p.K + c * kChunk, chunk(c), make(group_values(s[2 * c], off[2 * c])),
             make(group_values(s[2 * c + 1], off[2 * c + 1])));
    } else {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t glo = (c * kChunk) / p.gs, ghi = (c * kChunk + 32) / p.gs;
        emit(n * p.K + c * kChunk, chunk(c), make(group_values(s[glo], off[glo])),
             make(group_values(s[ghi], off[ghi])));
      }
    }
  }
}

// vpermps reads the low 4 bits of each lane: a byte's low nibble indexes the table as it is
void dequant_f32(const Problem& p, float* out, int64_t n0, int64_t n1) {
  dequant_rows<__m512>(p, n0, n1, [](__m512 v) { return v; },
                       [out](int64_t i, const uint8_t* bytes, __m512 lo, __m512 hi) {
    for (int j = 0; j < 32; j += 16) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j)));
      _mm512_storeu_ps(out + i + j, _mm512_permutexvar_ps(v, lo));
      _mm512_storeu_ps(out + i + 32 + j, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), hi));
    }
  });
}

// 16 float32 values rounded to bfloat16 as a cast rounds them (c10::BFloat16: to nearest even, NaN to 0x7FC0),
// in integer arithmetic: no AVX-512 BF16 needed, so the loops that call it inline it (a function of a wider
// target is not inlined into them: with vcvtneps2bf16 the conversion was a call per 16 values).
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                     _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// The bfloat16 table doubled into 32 lanes: vpermw reads the low 5 bits of each 16-bit lane, so a byte's low
// nibble indexes it without a mask (the high nibble's lowest bit picks the copy).
inline __m512i bf16_table(__m512 v) {
  const __m256i h = to_bf16(v);
  return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}

void dequant_bf16(const Problem& p, at::BFloat16* out, int64_t n0, int64_t n1) {
  dequant_rows<__m512i>(p, n0, n1, bf16_table, [out](int64_t i, const uint8_t* bytes, __m512i lo, __m512i hi) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(v, lo));
    _mm512_storeu_si512(out + i + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), hi));
  });
}

// The same for int8 codes (row-major [·, K]; groups of a multiple of 16 columns): q · s − offset, 16 at a time.
template <class Store>
inline void dequant8_rows(const Problem& p, int64_t n0, int64_t n1, Store store) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = reinterpret_cast<const int8_t*>(p.w) + n * p.K;
    for (int64_t g = 0; g < p.G; ++g) {
      const __m512 s = _mm512_set1_ps(p.s[n * p.G + g]), off = _mm512_set1_ps(p.off[n * p.G + g]);
      for (int64_t k = g * p.gs; k < (g + 1) * p.gs; k += 16) {
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
        store(n * p.K + k, _mm512_sub_ps(_mm512_mul_ps(q, s), off));
      }
    }
  }
}

void dequant8_f32(const Problem& p, float* out, int64_t n0, int64_t n1) {
  dequant8_rows(p, n0, n1, [out](int64_t i, __m512 v) { _mm512_storeu_ps(out + i, v); });
}
}  // namespace avx512

// ---- AVX-512 BF16 (int4 only; int8 runs the AVX-512 path) --------------------------------------------------------

#pragma GCC target("avx512f,avx512bw,avx512bf16")
namespace avx512bf16 {
// A code q becomes the bfloat16 number 128 + q by setting the bits of 128 (0x4300) above it: 128 + q is exact
// in bfloat16 (8 significant bits) for q < 128, so one OR replaces a table lookup. The sums then hold
// Σ (128 + q) · x, and the tile subtracts 128 · s · Σ x with the offsets (CODE_BIAS).
// One 32-byte chunk widened once to 16-bit lanes serves both halves.
#define XROW(p, m) ((p).xb + (m) * (p).K)
#define CODE_BIAS 128.f
#define INT4_HALVES(bytes, x, lo, hi)                                                                   \
  {                                                                                                     \
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes))); \
    const __m512i bias = _mm512_set1_epi16(0x4300);                                                     \
    lo = _mm512_dpbf16_ps(lo, (__m512bh)_mm512_ternarylogic_epi32(v, _mm512_set1_epi16(15), bias, 0xEA),  \
                          (__m512bh)_mm512_loadu_si512((x)));                                          \
    hi = _mm512_dpbf16_ps(hi, (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), bias),                 \
                          (__m512bh)_mm512_loadu_si512((x) + 32));                                     \
  }
#include "cpu_gemm_tiles.inc"   // INT8_STEP undefined: int8 takes the AVX-512 path
#undef VEC
#undef VZERO
#undef VSET1
#undef VADD
#undef VFMA
#undef VREDUCE
#undef XROW
#undef INT4_HALVES
#undef INT8_STEP
#undef CODE_BIAS

// avx512::dequant8_rows rounding to bfloat16 with vcvtneps2bf16, written out here: given to that loop as a lambda
// of this wider target, the conversion was not inlined (a call per 16 values); avx512::to_bf16 inline instead
// was slower still for int8 codes, which round every value rather than a table's 16 per group (BENCHMARKS.md).
void dequant8_bf16(const Problem& p, at::BFloat16* out, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = reinterpret_cast<const int8_t*>(p.w) + n * p.K;
    for (int64_t g = 0; g < p.G; ++g) {
      const __m512 s = _mm512_set1_ps(p.s[n * p.G + g]), off = _mm512_set1_ps(p.off[n * p.G + g]);
      for (int64_t k = g * p.gs; k < (g + 1) * p.gs; k += 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + n * p.K + k),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(_mm512_mul_ps(q, s), off)));
      }
    }
  }
}
}  // namespace avx512bf16
#pragma GCC pop_options

struct Activations {
  const uint16_t* xb;
  const float* xf;
  const float* xsum;
};

// The activations as every path reads them, prepared in plain loops (a handful of ATen ops here would cost as
// much as the matmul itself at one row): bfloat16 bits, the same values in float32, and their group sums.
// The buffer is per thread and reused, so a decode step allocates nothing here.
Activations prepare_activations(const at::Tensor& x, int64_t G, int64_t group_size) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor xc = x.contiguous();
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(M * K + M * G + (M * K + 1) / 2 + 16));
  float* xf = buf.data();
  float* xsum = xf + M * K;
  uint16_t* xb = reinterpret_cast<uint16_t*>(xsum + M * G);
  const bool is_f32 = xc.scalar_type() == at::kFloat;
  const float* x32 = is_f32 ? xc.data_ptr<float>() : nullptr;
  const at::BFloat16* x16 = is_f32 ? nullptr : xc.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * K; ++i) {
    const float v = is_f32 ? x32[i] : static_cast<float>(x16[i]);
    const at::BFloat16 b(v);   // round to nearest even, as a cast to bfloat16 does
    xb[i] = b.x;
    xf[i] = static_cast<float>(b);
  }
  for (int64_t i = 0; i < M * G; ++i) {
    float t = 0.f;
    for (int64_t k = 0; k < group_size; ++k) t += xf[i * group_size + k];
    xsum[i] = t;
  }
  return {xb, xf, xsum};
}

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")) return 3;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

// Scales [N, G] and offsets [N, G] of one dtype: float32, float16 or bfloat16; or, with 16-bit scales, offsets
// float32 [1] = c, meaning every offset is c times its scale (symmetric formats: c = 2^(bits−1), or 0), with c
// zero or a power of two so that c · s is exact; or, with 16-bit scales, offsets uint8 [N, G]: zero points z,
// every offset z · s (asymmetric formats).
using Super = std::optional<at::Tensor>;

void check_scales(const char* op, const at::Tensor& scales, const at::Tensor& offsets, const Super& scale_super = {},
                  const Super& offset_super = {}) {
  const auto t = scales.scalar_type();
  TORCH_CHECK(scale_super.has_value() || !offset_super.has_value(), op, ": offset_super needs scale_super");
  if (scale_super.has_value()) {   // two-level scales (see "Two-level scales")
    const at::Tensor& d = *scale_super;
    TORCH_CHECK((t == at::kChar || t == at::kByte) && scales.dim() == 2, op,
                ": with scale_super, scales must be int8 or uint8 codes [N, G]");
    TORCH_CHECK((d.scalar_type() == at::kHalf || d.scalar_type() == at::kBFloat16) && d.dim() == 2 &&
                d.size(0) == scales.size(0) && d.size(1) > 0 && scales.size(1) % d.size(1) == 0, op,
                ": scale_super must be float16 or bfloat16 [N, S] with S dividing the scales' G");
    if (!offset_super.has_value() && offsets.scalar_type() == at::kByte) {   // zero points: offsets z · scale
      TORCH_CHECK(offsets.sizes() == scales.sizes(), op, ": zero points must be uint8 [N, G] as the scales");
      return;
    }
    if (offset_super.has_value()) {
      const at::Tensor& dm = *offset_super;
      TORCH_CHECK(dm.scalar_type() == d.scalar_type() && dm.sizes() == d.sizes(), op,
                  ": offset_super must be as scale_super");
      TORCH_CHECK(offsets.scalar_type() == at::kByte && offsets.sizes() == scales.sizes(), op,
                  ": with offset_super, offsets must be uint8 codes [N, G]");
      return;
    }
  } else {
    TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
                ": scales must be float32, float16 or bfloat16");
  }
  if (offsets.dim() == 1 && offsets.numel() == 1 && t != at::kFloat) {
    TORCH_CHECK(offsets.scalar_type() == at::kFloat, op, ": offsets given as a multiple of the scales must be float32 [1]");
    const float c = *offsets.data_ptr<float>();
    int e = 0;
    TORCH_CHECK(c == 0.f || std::fabs(std::frexp(c, &e)) == 0.5f, op,
                ": offsets as a multiple of the scales need a multiple of 0 or a power of two");
    return;
  }
  TORCH_CHECK(!scale_super.has_value(), op,
              ": with scale_super, offsets must be float32 [1], uint8 zero points, or codes with offset_super");
  TORCH_CHECK(offsets.scalar_type() == t || (offsets.scalar_type() == at::kByte && t != at::kFloat), op,
              ": scales and offsets must be float32, float16 or bfloat16, both the same (or 16-bit scales and uint8 zero points)");
}

// Offsets [N, G] as the scales, or float32 [1] (see check_scales).
bool offsets_match(const at::Tensor& scales, const at::Tensor& offsets) {
  return offsets.sizes() == scales.sizes() || (offsets.dim() == 1 && offsets.numel() == 1 && scales.scalar_type() != at::kFloat);
}


Scales16 scales16(const at::Tensor& s, const at::Tensor& off, const at::Tensor& s_super = {},
                  const at::Tensor& off_super = {}) {
  if (s_super.defined()) {
    Scales16 h;
    h.s_super = static_cast<const uint16_t*>(s_super.data_ptr());
    h.bf16 = s_super.scalar_type() == at::kBFloat16;
    h.codes = static_cast<const int8_t*>(s.data_ptr());
    h.codes_unsigned = s.scalar_type() == at::kByte;
    h.per_super = s.size(1) / s_super.size(1);
    if (off_super.defined()) {
      h.off_super = static_cast<const uint16_t*>(off_super.data_ptr());
      h.zeros = off.data_ptr<uint8_t>();
    } else if (off.scalar_type() == at::kByte) {
      h.zeros = off.data_ptr<uint8_t>();
    } else {
      h.per_scale = *off.data_ptr<float>();
    }
    return h;
  }
  if (s.scalar_type() == at::kFloat) return {};
  const bool multiple = off.scalar_type() == at::kFloat;   // float32 [1]: offsets = c · scales
  const bool zeros = off.scalar_type() == at::kByte;       // uint8 [N, G]: offsets = z · scales
  return {static_cast<const uint16_t*>(s.data_ptr()),
          multiple || zeros ? nullptr : static_cast<const uint16_t*>(off.data_ptr()),
          zeros ? off.data_ptr<uint8_t>() : nullptr, s.scalar_type() == at::kBFloat16,
          multiple ? *off.data_ptr<float>() : 0.f};
}

// An op's scales and offsets, contiguous and read through Scales16 (kept here so that they live as long as the call).
struct ScaleArgs {
  at::Tensor s, off, s_super, off_super;
  Scales16 h;
  ScaleArgs(const at::Tensor& scales, const at::Tensor& offsets, const Super& ss, const Super& os)
      : s(scales.contiguous()), off(offsets.contiguous()),
        s_super(ss.has_value() ? ss->contiguous() : at::Tensor()), off_super(os.has_value() ? os->contiguous() : at::Tensor()),
        h(scales16(s, off, s_super, off_super)) {}
  // the float32 scales and offsets, or null where Scales16 widens them
  const float* fs() const { return s.scalar_type() == at::kFloat ? s.data_ptr<float>() : nullptr; }
  const float* foff() const { return fs() ? off.data_ptr<float>() : nullptr; }
};

void check_common(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                  const at::Tensor& offsets, const Super& ss = {}, const Super& os = {}) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && scales.dim() == 2, op, ": x [M, K], weights [N, ·], scales [N, G]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16");
  check_scales(op, scales, offsets, ss, os);
}

int64_t resolve_isa(const char* op, int64_t isa) {
  const int64_t have = best_isa();
  if (isa < 0) return have;
  TORCH_CHECK(isa <= have, op, ": this CPU lacks the instructions of path ", isa);
  return isa;
}

template <class Rows>
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& offsets,
               const Super& ss, const Super& os, int64_t group_size, Rows rows, int bits = 0) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / group_size;
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == G && offsets_match(scales, offsets),
              "scales and offsets must be [N, K / group_size]");
  const Activations a = prepare_activations(x, G, group_size);
  const at::Tensor wc = w.contiguous();
  const ScaleArgs sa(scales, offsets, ss, os);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const Problem p{a.xb, a.xf, a.xsum, static_cast<const uint8_t*>(wc.data_ptr()), sa.fs(), sa.foff(),
                  y.data_ptr<float>(), M, N, K, G, group_size};
  const Scales16& h = sa.h;
  // Rows of W are independent: split them across threads in runs long enough to amortize the hand-off, in whole
  // blocks of four rows (the tiles read the weight as stored; packed codes are unpacked to row-major first)
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    over_rows(p, h, wc.size(1), 4 * b0, std::min(N, 4 * b1),
              [&](const Problem& q, int64_t r0, int64_t r1, int64_t) { rows(q, r0, r1); }, bits, bits != 0);
  });
  return y;
}

// int8 ops' weights: int8 [N, K] codes (returns 0), or uint8 codes of 2-3 or 5-7 bits packed (returns the bits).
int int8_codes(const char* op, const at::Tensor& wq, int64_t K) {
  if (wq.scalar_type() == at::kByte) {
    const int bits = packed_bits(wq.size(1), K);
    TORCH_CHECK(bits != 0, op, ": uint8 wq must be 2-3- or 5-7-bit codes packed as [N, bits * K/8] or [N, K/2 + (bits - 4) * K/8], K a multiple of 64");
    return bits;
  }
  TORCH_CHECK(wq.scalar_type() == at::kChar, op, ": wq must be int8 (or uint8 packed codes)");
  TORCH_CHECK(K % 32 == 0 && wq.size(1) == K, op, ": K must be a multiple of 32 and wq [N, K]");
  return 0;
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& wpack, const at::Tensor& scales,
                     const at::Tensor& offsets, int64_t group_size, int64_t isa, const Super& ss, const Super& os) {
  check_common("int4_gemm", x, wpack, scales, offsets, ss, os);
  TORCH_CHECK(wpack.scalar_type() == at::kByte, "int4_gemm: wpack must be uint8");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % kChunk == 0 && wpack.size(1) * 2 == K, "int4_gemm: K must be a multiple of 64 and wpack [N, K/2]");
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "int4_gemm: group_size must be a multiple of 32 dividing K");
  TORCH_CHECK(group_size == 32 || group_size % kChunk == 0, "int4_gemm: groups above 32 must be multiples of 64");
  // By default AVX-512 CPUs take the float32 path (2) for int4: on an Intel Xeon with AMX (Sapphire Rapids class)
  // it measured 5-10% faster than the bfloat16 one (3), which also loses precision to the code bias (about
  // 1e-5 relative against 1e-7). Path 3 stays available to measure on other CPUs.
  switch (isa < 0 ? std::min<int64_t>(best_isa(), 2) : resolve_isa("int4_gemm", isa)) {
    case 3: return run(x, wpack, scales, offsets, ss, os, group_size, avx512bf16::int4_rows);
    case 2: return run(x, wpack, scales, offsets, ss, os, group_size, avx512::int4_rows);
    case 1: return run(x, wpack, scales, offsets, ss, os, group_size, avx2::int4_rows);
    default: return run(x, wpack, scales, offsets, ss, os, group_size, portable::int4_rows);
  }
}

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& offsets,
                     int64_t group_size, int64_t isa, const Super& ss, const Super& os) {
  check_common("int8_gemm", x, wq, scales, offsets, ss, os);
  const int64_t K = x.size(1);
  const int bits = int8_codes("int8_gemm", wq, K);
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "int8_gemm: group_size must be a multiple of 32 dividing K");
  switch (resolve_isa("int8_gemm", isa)) {
    case 3:
    case 2: return run(x, wq, scales, offsets, ss, os, group_size, avx512::int8_rows, bits);
    case 1: return run(x, wq, scales, offsets, ss, os, group_size, avx2::int8_rows, bits);
    default: return run(x, wq, scales, offsets, ss, os, group_size, portable::int8_rows, bits);
  }
}

// The weight dequantized, [N, K] float32 or bfloat16 (for the dense prefill path): (q − z) · s computed as
// q · s − offset in float32 (a product, then a difference), then rounded once to the output type. AVX-512 CPUs
// run the loops above; elsewhere plain loops that the compiler vectorizes through target_clones.
template <class Out>
__attribute__((target_clones("avx512f", "avx2", "default")))
void dequant_rows(const uint8_t* w, const float* s, const float* off, Out* out, int64_t n0, int64_t n1, int64_t K,
                  int64_t G, int64_t gs) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    Out* o = out + n * K;
    for (int64_t c = 0; c < K / kChunk; ++c) {
      const int64_t glo = (c * kChunk) / gs, ghi = (c * kChunk + 32) / gs;
      const float slo = s[n * G + glo], olo = off[n * G + glo], shi = s[n * G + ghi], ohi = off[n * G + ghi];
      for (int j = 0; j < 32; ++j) {
        const uint8_t b = wr[c * 32 + j];
        o[c * kChunk + j] = static_cast<Out>(static_cast<float>(b & 15) * slo - olo);
        o[c * kChunk + 32 + j] = static_cast<Out>(static_cast<float>(b >> 4) * shi - ohi);
      }
    }
  }
}

void check_dequant(const at::Tensor& wpack, const at::Tensor& scales, const at::Tensor& offsets, int64_t group_size,
                   at::ScalarType dtype, const Super& ss, const Super& os) {
  TORCH_CHECK(wpack.scalar_type() == at::kByte && wpack.dim() == 2, "int4_dequant: wpack must be uint8 [N, K/2]");
  check_scales("int4_dequant", scales, offsets, ss, os);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int4_dequant: dtype must be float32 or bfloat16");
  const int64_t N = wpack.size(0), K = wpack.size(1) * 2;
  TORCH_CHECK(K % kChunk == 0 && group_size % 32 == 0 && K % group_size == 0,
              "int4_dequant: K must be a multiple of 64 and group_size a multiple of 32 dividing K");
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == K / group_size && offsets_match(scales, offsets),
              "int4_dequant: scales and offsets must be [N, K / group_size]");
}

// Rows n0..n1 of the dequantized weight into out (row n0 first, n0 the first row of a block of four), on the
// calling thread: the AVX-512 loops read the weight as stored; the plain loops read codes copied to row-major.
void dequant_run(const Problem& p, const Scales16& h, int64_t n0, int64_t n1, at::ScalarType dtype, void* out,
                 int64_t isa) {
  over_rows(p, h, p.K / 2, n0, n1, [&](const Problem& q, int64_t a, int64_t b, int64_t base) {
    if (dtype == at::kFloat) {
      float* o = static_cast<float*>(out) + (base - n0) * p.K;
      if (isa >= 2) avx512::dequant_f32(q, o, a, b);
      else dequant_rows(q.w, q.s, q.off, o, a, b, q.K, q.G, q.gs);
    } else {
      at::BFloat16* o = static_cast<at::BFloat16*>(out) + (base - n0) * p.K;
      if (isa >= 2) avx512::dequant_bf16(q, o, a, b);
      else dequant_rows(q.w, q.s, q.off, o, a, b, q.K, q.G, q.gs);
    }
  }, 0, isa < 2);
}

// The same across threads, in runs of 64 rows (n0 a multiple of 64: tiles start there).
void dequant_into(const Problem& p, const Scales16& h, int64_t n0, int64_t n1, at::ScalarType dtype, void* out) {
  const int64_t isa = best_isa();
  const int64_t elem = dtype == at::kFloat ? 4 : 2;
  at::parallel_for(0, (n1 - n0 + 63) / 64, 1, [&](int64_t r0, int64_t r1) {
    dequant_run(p, h, n0 + r0 * 64, std::min(n1, n0 + r1 * 64), dtype,
                static_cast<uint8_t*>(out) + r0 * 64 * p.K * elem, isa);
  });
}

Problem weight_problem(const at::Tensor& w, const ScaleArgs& sa, int64_t group_size) {
  const int64_t N = w.size(0), K = w.size(1) * 2;
  return Problem{nullptr, nullptr, nullptr, w.data_ptr<uint8_t>(), sa.fs(), sa.foff(), nullptr, 0, N, K, K / group_size,
                 group_size};
}

at::Tensor int4_dequant(const at::Tensor& wpack, const at::Tensor& scales, const at::Tensor& offsets,
                        int64_t group_size, at::ScalarType dtype, const Super& ss, const Super& os) {
  check_dequant(wpack, scales, offsets, group_size, dtype, ss, os);
  const at::Tensor w = wpack.contiguous();
  const ScaleArgs sa(scales, offsets, ss, os);
  const Problem p = weight_problem(w, sa, group_size);
  at::Tensor out = at::empty({p.N, p.K}, wpack.options().dtype(dtype));
  dequant_into(p, sa.h, 0, p.N, dtype, out.data_ptr());
  return out;
}

#include "cpu_gemm_amx.inc"

// y = x · Wᵀ [M, N] for many rows of x (where amx::linear does not take them): the weight is dequantized a tile
// of rows at a time into a buffer kept by the thread (at most about 4 MB, so it stays in cache for its matmul and
// a call neither page-faults a fresh allocation nor holds a whole dequantized matrix) and multiplied in `dtype`
// by ATen. y is in `dtype` where x is (bfloat16 activations, as `lowbit quantize` writes models by default: no
// conversion either way, and a weight of one tile is one matmul straight into y), else float32.
// Measured (Intel Xeon with AMX, 512 rows of bfloat16 activations, 3072x576): float32 output then converted back
// cost about 300 µs of a 1270 µs call; tiles of 1 MB or less instead of 4 were 1.5-2x slower (more, smaller
// matmuls), so the block shapes of the default model are one tile each.
// The tiling shared by the dense paths: dequant(n0, n1, buffer) writes output rows n0..n1 of the weight into
// the buffer, as [n1 − n0, K] (row-major) or, with `k_major`, as [K, n1 − n0]; tiles start at multiples of 64.
template <class Dequant>
at::Tensor tiled_linear(const at::Tensor& x, int64_t N, int64_t K, at::ScalarType dtype, bool k_major,
                        Dequant dequant) {
  const int64_t elem = dtype == at::kFloat ? 4 : 2;
  const int64_t tile = std::max<int64_t>(64, ((int64_t(4) << 20) / (K * elem)) / 64 * 64);
  thread_local std::vector<uint8_t> buf;
  void* ws = aligned64(buf, static_cast<size_t>(std::min(tile, N) * K * elem));
  const at::Tensor xd = x.to(dtype).contiguous();
  const at::ScalarType out = x.scalar_type() == dtype ? dtype : at::kFloat;
  at::Tensor y;
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t n1 = std::min(N, n0 + tile);
    dequant(n0, n1, ws);
    const at::Tensor wt = k_major ? at::from_blob(ws, {K, n1 - n0}, x.options().dtype(dtype))
                                  : at::from_blob(ws, {n1 - n0, K}, x.options().dtype(dtype)).t();
    if (n1 - n0 == N && out == dtype) return at::mm(xd, wt);
    if (!y.defined()) y = at::empty({x.size(0), N}, x.options().dtype(out));
    y.narrow(1, n0, n1 - n0).copy_(at::mm(xd, wt));
  }
  return y;
}

at::Tensor int4_dense_linear(const at::Tensor& x, const at::Tensor& wpack, const at::Tensor& scales,
                             const at::Tensor& offsets, int64_t group_size, at::ScalarType dtype, const Super& ss,
                             const Super& os) {
  check_dequant(wpack, scales, offsets, group_size, dtype, ss, os);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == wpack.size(1) * 2, "int4_dense_linear: x must be [M, K]");
  const at::Tensor w = wpack.contiguous();
  const ScaleArgs sa(scales, offsets, ss, os);
  const Problem p = weight_problem(w, sa, group_size);
  const Scales16& h = sa.h;
  if (amx::takes(x, p.K, dtype)) {
    const int64_t isa = best_isa();
    return amx::linear(x, p.N, p.K, [&](int64_t n0, int64_t n1, at::BFloat16* out) {
      dequant_run(p, h, n0, n1, dtype, out, isa);
    });
  }
  return tiled_linear(x, p.N, p.K, dtype, false, [&](int64_t n0, int64_t n1, void* ws) {
    dequant_into(p, h, n0, n1, dtype, ws);
  });
}

// int8 codes (row-major [·, K], or 5-7-bit packed: unpacked by over_rows first) dequantized as q · s − offset in
// float32, rounded once to Out, rows n0..n1; groups of any size dividing K (16 included).
template <class Out>
__attribute__((target_clones("avx512f", "avx2", "default")))
void dequant8_rows(const int8_t* w, const float* s, const float* off, Out* out, int64_t n0, int64_t n1, int64_t K,
                   int64_t G, int64_t gs) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const float sg = s[n * G + g], og = off[n * G + g];
      const int8_t* q = w + n * K + g * gs;
      Out* o = out + n * K + g * gs;
      for (int64_t k = 0; k < gs; ++k) o[k] = static_cast<Out>(static_cast<float>(q[k]) * sg - og);
    }
}

// Prefill for the int8 layouts (native-int8's many rows): as int4_dense_linear, a tile of rows dequantized at a
// time into the thread's buffer and multiplied by ATen in dtype.
at::Tensor int8_dense_linear(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                             const at::Tensor& offsets, int64_t group_size, at::ScalarType dtype, const Super& ss,
                             const Super& os) {
  check_common("int8_dense_linear", x, wq, scales, offsets, ss, os);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int8_dense_linear: dtype must be float32 or bfloat16");
  const int64_t K = x.size(1), N = wq.size(0);
  const int bits = int8_codes("int8_dense_linear", wq, K);
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "int8_dense_linear: group_size must divide K");
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == G && offsets_match(scales, offsets),
              "int8_dense_linear: scales and offsets must be [N, K / group_size]");
  const at::Tensor w = wq.contiguous();
  const ScaleArgs sa(scales, offsets, ss, os);
  const Problem p{nullptr, nullptr, nullptr, static_cast<const uint8_t*>(w.data_ptr()), sa.fs(), sa.foff(), nullptr, 0,
                  N, K, G, group_size};
  const Scales16& h = sa.h;
  const int64_t isa = group_size % 16 == 0 ? best_isa() : 0;
  // rows n0..n1 (n0 a multiple of 4) into out, row-major, on the calling thread
  const auto run = [&](int64_t n0, int64_t n1, void* out) {
    over_rows(p, h, w.size(1), n0, n1, [&](const Problem& q, int64_t a, int64_t b, int64_t base) {
      const int8_t* codes = reinterpret_cast<const int8_t*>(q.w);
      if (dtype == at::kFloat) {
        float* o = static_cast<float*>(out) + (base - n0) * K;
        if (isa >= 2) avx512::dequant8_f32(q, o, a, b);
        else dequant8_rows(codes, q.s, q.off, o, a, b, K, G, group_size);
      } else {
        at::BFloat16* o = static_cast<at::BFloat16*>(out) + (base - n0) * K;
        if (isa == 3) avx512bf16::dequant8_bf16(q, o, a, b);
        else dequant8_rows(codes, q.s, q.off, o, a, b, K, G, group_size);
      }
    }, bits, true);
  };
  if (amx::takes(x, K, dtype))
    return amx::linear(x, N, K, [&](int64_t n0, int64_t n1, at::BFloat16* out) { run(n0, n1, out); });
  const int64_t elem = dtype == at::kFloat ? 4 : 2;
  return tiled_linear(x, N, K, dtype, false, [&](int64_t n0, int64_t n1, void* ws) {
    at::parallel_for(n0, n1, 16, [&](int64_t a0, int64_t b0) {
      run(a0, b0, static_cast<uint8_t*>(ws) + (a0 - n0) * K * elem);
    });
  });
}

// ---- PyTorch's CPU int4 layout (aten._convert_weight_to_int4pack_for_cpu), for its prefill -----------------------
// PyTorch's own GEMV on this layout is the fastest decode kernel where the CPU has AVX-512 BF16, but its matmul
// for many rows is several times slower than a dense one; this dequantizes it a tile at a time instead.
//   wpack       uint8 [N, K/2]: output rows in blocks of B (PyTorch picks B by the CPU it runs on: 64 with
//               AVX-512, 32 with AVX2; the caller passes it as block_rows); for each column k a block holds B/2
//               bytes, byte j = row j (low nibble) | row j + B/2 (high nibble). A last block of T < B rows
//               (T % 16 == 0) holds T/2 bytes per column, byte j = row 2j (low) | row 2j + 1 (high). Blocks follow
//               each other.
//   scale_zeros bfloat16 [K / group_size, N, 2]: scale s and offset o per group and row; w = (q − 8) · s + o.
template <class Out>
__attribute__((target_clones("avx512f", "avx2", "default")))
void dequant_int4pack_block(const uint8_t* w, const at::BFloat16* sz, Out* out, int64_t rows, int64_t block,
                            int64_t ld, int64_t N, int64_t K, int64_t gs) {
  // one block of `rows` output rows starting at row n (w and sz already point at it), written k-major:
  // out[k * ld + r] for r < rows
  float s[64], o[64];
  const int64_t bytes = rows / 2;
  for (int64_t k = 0; k < K; ++k) {
    if (k % gs == 0) {
      const at::BFloat16* g = sz + (k / gs) * N * 2;
      for (int64_t r = 0; r < rows; ++r) {
        s[r] = static_cast<float>(g[2 * r]);
        o[r] = static_cast<float>(g[2 * r + 1]) - 8.f * s[r];
      }
    }
    const uint8_t* b = w + k * bytes;
    Out* d = out + k * ld;
    if (rows == block) {
      for (int64_t j = 0; j < bytes; ++j) {
        d[j] = static_cast<Out>(static_cast<float>(b[j] & 15) * s[j] + o[j]);
        d[j + bytes] = static_cast<Out>(static_cast<float>(b[j] >> 4) * s[j + bytes] + o[j + bytes]);
      }
    } else {
      for (int64_t j = 0; j < bytes; ++j) {
        d[2 * j] = static_cast<Out>(static_cast<float>(b[j] & 15) * s[2 * j] + o[2 * j]);
        d[2 * j + 1] = static_cast<Out>(static_cast<float>(b[j] >> 4) * s[2 * j + 1] + o[2 * j + 1]);
      }
    }
  }
}

at::Tensor int4pack_dense_linear(const at::Tensor& x, const at::Tensor& wpack, const at::Tensor& scale_zeros,
                                 int64_t group_size, at::ScalarType dtype, int64_t block_rows) {
  TORCH_CHECK(wpack.scalar_type() == at::kByte && wpack.dim() == 2, "int4pack_dense_linear: wpack must be uint8 [N, K/2]");
  TORCH_CHECK(block_rows == 16 || block_rows == 32 || block_rows == 64, "int4pack_dense_linear: block_rows must be 16, 32 or 64");
  TORCH_CHECK(scale_zeros.scalar_type() == at::kBFloat16 && scale_zeros.dim() == 3 && scale_zeros.size(2) == 2,
              "int4pack_dense_linear: scale_zeros must be bfloat16 [K / group_size, N, 2]");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int4pack_dense_linear: dtype must be float32 or bfloat16");
  const int64_t N = wpack.size(0), K = wpack.size(1) * 2;
  TORCH_CHECK(N % 16 == 0 && group_size > 0 && K % group_size == 0 && scale_zeros.size(0) == K / group_size &&
              scale_zeros.size(1) == N, "int4pack_dense_linear: shapes do not match PyTorch's int4 layout");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int4pack_dense_linear: x must be [M, K]");
  const at::Tensor w = wpack.contiguous(), sz = scale_zeros.contiguous();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::BFloat16* szp = sz.data_ptr<at::BFloat16>();
  return tiled_linear(x, N, K, dtype, true, [&](int64_t n0, int64_t n1, void* ws) {
    const int64_t cols = n1 - n0;
    // tiles are whole multiples of 64 rows (tiled_linear), so of every block size: no block straddles two tiles
    const int64_t B = block_rows;
    at::parallel_for(0, (cols + B - 1) / B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = n0 + b * B, rows = std::min<int64_t>(B, N - n);
        const uint8_t* wb = wp + n * (K / 2);   // every earlier block holds B/2 bytes per column
        if (dtype == at::kFloat)
          dequant_int4pack_block(wb, szp + n * 2, static_cast<float*>(ws) + b * B, rows, B, cols, N, K, group_size);
        else
          dequant_int4pack_block(wb, szp + n * 2, static_cast<at::BFloat16*>(ws) + b * B, rows, B, cols, N, K,
                                 group_size);
      }
    });
  });
}

// ---- int8 activations on integer dot products: cpu_gemm_q8.inc (AVX-512 VNNI), cpu_gemm_q8_avx2.inc (AVX2) ------

#include "cpu_gemm_q8.inc"
#include "cpu_gemm_q8_avx2.inc"

// Which int8-activation decode this CPU runs: 2 AVX-512 VNNI, 1 AVX2 (pairs of byte products, see
// cpu_gemm_q8_avx2.inc), 0 none
int q8_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

template <bool Int4>
at::Tensor run_q8(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                  const at::Tensor& offsets, const Super& ss, const Super& os, int64_t group_size, int bits,
                  int64_t level) {
  static const int best = q8_level();
  if (level < 0) level = best;
  TORCH_CHECK(best > 0, op, ": this CPU has neither AVX-512 VNNI nor AVX2");
  TORCH_CHECK(level >= 1 && level <= best, op, ": level ", level, " is not available on this CPU (best: ", best, ")");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / group_size;
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == G && offsets_match(scales, offsets),
              "scales and offsets must be [N, K / group_size]");
  const Q8Activations qa = quantize_activations(x, G, group_size, Int4,
                                                level == 2 ? avx512vnni::round_row : avx2dot::round_row);
  const at::Tensor wc = w.contiguous();
  const ScaleArgs sa(scales, offsets, ss, os);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  // packed 5-7-bit codes are unpacked in the loop's registers here (a buffer round trip measured 30-60% slower)
  const Problem p{nullptr, nullptr, nullptr, static_cast<const uint8_t*>(wc.data_ptr()), sa.fs(), sa.foff(),
                  y.data_ptr<float>(), M, N, K, G, group_size, bits, wc.size(1)};
  const Scales16& h = sa.h;
  // split in whole blocks of four rows: the loops read the weight as stored (see "Rows in blocks of four")
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    over_rows(p, h, wc.size(1), 4 * b0, std::min(N, 4 * b1), [&](const Problem& q, int64_t r0, int64_t r1, int64_t) {
      if (level == 2) avx512vnni::rows<Int4>(q, qa, r0, r1);
      else avx2dot::rows<Int4>(q, qa, r0, r1);
    });
  });
  return y;
}

at::Tensor int4_gemm_q8(const at::Tensor& x, const at::Tensor& wpack, const at::Tensor& scales,
                        const at::Tensor& offsets, int64_t group_size, const Super& ss, const Super& os, int64_t level) {
  check_common("int4_gemm_q8", x, wpack, scales, offsets, ss, os);
  TORCH_CHECK(wpack.scalar_type() == at::kByte, "int4_gemm_q8: wpack must be uint8");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % kChunk == 0 && wpack.size(1) * 2 == K, "int4_gemm_q8: K must be a multiple of 64 and wpack [N, K/2]");
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0,
              "int4_gemm_q8: group_size must be a multiple of 32 dividing K");
  return run_q8<true>("int4_gemm_q8", x, wpack, scales, offsets, ss, os, group_size, 0, level);
}

at::Tensor int8_gemm_q8(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                        const at::Tensor& offsets, int64_t group_size, const Super& ss, const Super& os, int64_t level) {
  check_common("int8_gemm_q8", x, wq, scales, offsets, ss, os);
  const int64_t K = x.size(1);
  const int bits = int8_codes("int8_gemm_q8", wq, K);
  TORCH_CHECK((group_size % 32 == 0 || group_size == 16) && K % group_size == 0,
              "int8_gemm_q8: group_size must be 16 or a multiple of 32 dividing K");
  return run_q8<false>("int8_gemm_q8", x, wq, scales, offsets, ss, os, group_size, bits, level);
}

// Packed codes (see "2-, 3- and 5- to 7-bit codes, packed") unpacked to int8 [N, K]: for the dense path and `restore`
// (isa 0 or 1: the portable loop, as CPUs without AVX-512 take it).
at::Tensor int8_unpack(const at::Tensor& wq, int64_t K, int64_t isa) {
  TORCH_CHECK(wq.scalar_type() == at::kByte && wq.dim() == 2, "int8_unpack: wq must be uint8 [N, ·]");
  const int bits = packed_bits(wq.size(1), K);
  TORCH_CHECK(bits != 0, "int8_unpack: wq is not packed codes for K = ", K);
  const at::Tensor w = wq.contiguous();
  const int64_t N = w.size(0), row_bytes = w.size(1);
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kChar));
  const uint8_t* src = w.data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    unpack_rows(src, N, row_bytes, n0, n1 - n0, dst + n0 * K, K, bits, isa >= 0 && isa < 2);
  });
  return out;
}

int64_t cpu_isa() { return best_isa(); }
int64_t cpu_q8() { return q8_level(); }
bool cpu_amx() { return amx::ready(); }

}  // namespace

TORCH_LIBRARY(lowbit, m) {
  m.def("int4_gemm(Tensor x, Tensor wpack, Tensor scales, Tensor offsets, int group_size, int isa=-1"
        ", Tensor? scale_super=None, Tensor? offset_super=None) -> Tensor");
  m.def("int8_gemm(Tensor x, Tensor wq, Tensor scales, Tensor offsets, int group_size, int isa=-1"
        ", Tensor? scale_super=None, Tensor? offset_super=None) -> Tensor");
  m.def("int4_dequant(Tensor wpack, Tensor scales, Tensor offsets, int group_size, ScalarType dtype"
        ", Tensor? scale_super=None, Tensor? offset_super=None) -> Tensor");
  m.def("int4_dense_linear(Tensor x, Tensor wpack, Tensor scales, Tensor offsets, int group_size, "
        "ScalarType dtype, Tensor? scale_super=None, Tensor? offset_super=None) -> Tensor");
  m.def("int4pack_dense_linear(Tensor x, Tensor wpack, Tensor scale_zeros, int group_size, ScalarType dtype, "
        "int block_rows) -> Tensor");
  m.def("int4_gemm_q8(Tensor x, Tensor wpack, Tensor scales, Tensor offsets, int group_size"
        ", Tensor? scale_super=None, Tensor? offset_super=None, int level=-1) -> Tensor");
  m.def("int8_gemm_q8(Tensor x, Tensor wq, Tensor scales, Tensor offsets, int group_size"
        ", Tensor? scale_super=None, Tensor? offset_super=None, int level=-1) -> Tensor");
  m.def("int8_unpack(Tensor wq, int K, int isa=-1) -> Tensor");
  m.def("int8_dense_linear(Tensor x, Tensor wq, Tensor scales, Tensor offsets, int group_size, ScalarType dtype"
        ", Tensor? scale_super=None, Tensor? offset_super=None) -> Tensor");
  m.def("cpu_isa() -> int", &cpu_isa);
  m.def("cpu_q8() -> int", &cpu_q8);
  m.def("cpu_amx() -> bool", &cpu_amx);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int4_gemm", &int4_gemm);
  m.impl("int8_gemm", &int8_gemm);
  m.impl("int4_dequant", &int4_dequant);
  m.impl("int4_dense_linear", &int4_dense_linear);
  m.impl("int4pack_dense_linear", &int4pack_dense_linear);
  m.impl("int4_gemm_q8", &int4_gemm_q8);
  m.impl("int8_gemm_q8", &int8_gemm_q8);
  m.impl("int8_unpack", &int8_unpack);
  m.impl("int8_dense_linear", &int8_dense_linear);
}
