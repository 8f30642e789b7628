// lowbit's native CPU matmul for integer weights of at most 4 bits: y = x · Wᵀ with W = (q − z) · s per group.
//
// Why a kernel of our own: with one row of activations (decode) PyTorch's packed int4 kernel streams about
// 20 GB/s of weights on these machines, a third of what memory delivers; the work per weight here is a few
// vector instructions, so a single row runs at memory speed.
//
// Layout (written by lowbit.kernels.simd, documented there too):
//   wpack   uint8 [N, K/2]: each row in chunks of 64 columns (32 bytes); byte j of chunk c holds the code of
//           column 64c + j in its low nibble and of column 64c + 32 + j in its high nibble, so that one
//           32-byte load yields two vectors of 32 consecutive columns each. K must be a multiple of 64.
//   scales  float32 [N, G], G = K / group_size, group_size a multiple of 32 dividing K.
//   offsets float32 [N, G]: z · s, so that (q − z) · s = q · s − offset.
// Then  y[m, n] = Σ_g s[n, g] · Σ_{k∈g} q[n, k] · x[m, k]  −  Σ_g offset[n, g] · Σ_{k∈g} x[m, k].
//
// Arithmetic: activations are rounded to bfloat16 (as PyTorch's packed kernels do), every product and sum is
// float32. The codes are small integers, exact in bfloat16. The order of the float32 sums differs between the
// instruction-set paths, so they agree to float32 rounding, not bit for bit; each path is deterministic.
//
// Paths, chosen at run time by what the CPU has (int4_gemm_isa tells which; `isa` forces one, for tests):
//   3  AVX-512 BF16: codes → bfloat16 through a 16-entry table (vpermw), 32 products per vdpbf16ps.
//   2  AVX-512F/BW: codes → float32, 16 products per FMA.
//   1  AVX2 + FMA: codes → float32, 8 products per FMA.
//   0  portable C++.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 64;   // columns per 32-byte chunk
constexpr int64_t kRows = 4;     // activation rows sharing one pass over the weights

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Problem {
  const uint16_t* xb;   // [M, K] bfloat16 bits
  const float* xf;      // [M, K] the same values as float32
  const float* xsum;    // [M, G] Σ x over each group (of the bfloat16 values, in float32)
  const uint8_t* w;     // [N, K/2]
  const float* s;       // [N, G]
  const float* off;     // [N, G]
  float* y;             // [M, N]
  int64_t M, N, K, G, gs;
};

// The offset term and the store, shared by every path: acc[r] holds Σ_g s · Σ q·x for activation row m0 + r.
inline void finish(const Problem& p, int64_t n, int64_t m0, int64_t rows, const float* acc) {
  const float* off = p.off + n * p.G;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xs = p.xsum + (m0 + r) * p.G;
    float o = 0.f;
    for (int64_t g = 0; g < p.G; ++g) o += off[g] * xs[g];
    p.y[(m0 + r) * p.N + n] = acc[r] - o;
  }
}

void rows_portable(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = p.w + n * (p.K / 2);
    const float* s = p.s + n * p.G;
    for (int64_t m0 = 0; m0 < p.M; m0 += kRows) {
      const int64_t rows = std::min(kRows, p.M - m0);
      float acc[kRows] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t r = 0; r < rows; ++r) {
        const float* x = p.xf + (m0 + r) * p.K;
        float total = 0.f;
        for (int64_t g = 0; g < p.G; ++g) {
          float dot = 0.f;
          for (int64_t k = g * p.gs; k < (g + 1) * p.gs; ++k) {
            const int64_t c = k / kChunk, j = k % kChunk;
            const uint8_t b = w[c * 32 + (j & 31)];
            const int q = j < 32 ? (b & 15) : (b >> 4);
            dot += static_cast<float>(q) * x[k];
          }
          total += s[g] * dot;
        }
        acc[r] = total;
      }
      finish(p, n, m0, rows, acc);
    }
  }
}

// Runs over one row n: for each group, every 32-column half-chunk's products are summed into the group's
// accumulators (one per activation row), which are scaled once per group. HALF(k, lo_or_hi, acc) is the
// path's "acc[r] += codes · x[r] over 32 columns" step. Groups of 32 take one half-chunk each; larger groups
// take whole chunks.
#define LOWBIT_ROW_LOOP(VEC, ZERO, HALF, FMA_SCALE, REDUCE)                                            \
  const uint8_t* w = p.w + n * (p.K / 2);                                                               \
  const float* s = p.s + n * p.G;                                                                       \
  for (int64_t m0 = 0; m0 < p.M; m0 += kRows) {                                                         \
    const int64_t rows = std::min(kRows, p.M - m0);                                                     \
    VEC total[kRows] = {ZERO, ZERO, ZERO, ZERO};                                                        \
    for (int64_t g = 0; g < p.G; ++g) {                                                                 \
      VEC acc[kRows] = {ZERO, ZERO, ZERO, ZERO};                                                        \
      if (p.gs == 32) {                                                                                 \
        const int64_t k = g * 32;                                                                       \
        HALF(w + (k / kChunk) * 32, (k % kChunk) != 0, k, acc);                                         \
      } else {                                                                                          \
        for (int64_t k = g * p.gs; k < (g + 1) * p.gs; k += kChunk) {                                   \
          HALF(w + (k / kChunk) * 32, false, k, acc);                                                   \
          HALF(w + (k / kChunk) * 32, true, k + 32, acc);                                               \
        }                                                                                               \
      }                                                                                                 \
      for (int64_t r = 0; r < rows; ++r) total[r] = FMA_SCALE(acc[r], s[g], total[r]);                \
    }                                                                                                   \
    float out[kRows];                                                                                   \
    for (int64_t r = 0; r < rows; ++r) out[r] = REDUCE(total[r]);                                       \
    finish(p, n, m0, rows, out);                                                                        \
  }

// ---- AVX2 + FMA --------------------------------------------------------------------------------------------

__attribute__((target("avx2,fma"))) inline float reduce8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

__attribute__((target("avx2,fma"))) void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  const __m256i mask = _mm256_set1_epi32(15);
  for (int64_t n = n0; n < n1; ++n) {
#define HALF(bytes, high, k, acc)                                                                       \
  for (int64_t i = 0; i < 32; i += 8) {                                                                 \
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>((bytes) + i)));   \
    v = (high) ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, mask);                                   \
    const __m256 q = _mm256_cvtepi32_ps(v);                                                             \
    for (int64_t r = 0; r < rows; ++r)                                                                  \
      acc[r] = _mm256_fmadd_ps(q, _mm256_loadu_ps(p.xf + (m0 + r) * p.K + (k) + i), acc[r]);            \
  }
#define FMA_SCALE(a, sc, t) _mm256_fmadd_ps(a, _mm256_set1_ps(sc), t)
    LOWBIT_ROW_LOOP(__m256, _mm256_setzero_ps(), HALF, FMA_SCALE, reduce8)
#undef HALF
#undef FMA_SCALE
  }
}

// ---- AVX-512F/BW ---------------------------------------------------------------------------------------------

__attribute__((target("avx512f,avx512bw"))) void rows_avx512(const Problem& p, int64_t n0, int64_t n1) {
  const __m512i mask = _mm512_set1_epi32(15);
  for (int64_t n = n0; n < n1; ++n) {
#define HALF(bytes, high, k, acc)                                                                       \
  for (int64_t i = 0; i < 32; i += 16) {                                                                \
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>((bytes) + i)));   \
    v = (high) ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, mask);                                   \
    const __m512 q = _mm512_cvtepi32_ps(v);                                                             \
    for (int64_t r = 0; r < rows; ++r)                                                                  \
      acc[r] = _mm512_fmadd_ps(q, _mm512_loadu_ps(p.xf + (m0 + r) * p.K + (k) + i), acc[r]);            \
  }
#define FMA_SCALE(a, sc, t) _mm512_fmadd_ps(a, _mm512_set1_ps(sc), t)
    LOWBIT_ROW_LOOP(__m512, _mm512_setzero_ps(), HALF, FMA_SCALE, _mm512_reduce_add_ps)
#undef HALF
#undef FMA_SCALE
  }
}

// ---- AVX-512 BF16 --------------------------------------------------------------------------------------------

__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_avx512bf16(const Problem& p, int64_t n0,
                                                                             int64_t n1) {
  alignas(64) uint16_t lut[32] = {0};
  for (int i = 0; i < 16; ++i) {   // bfloat16 bits of 0.0 .. 15.0 (exact)
    const float f = static_cast<float>(i);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    lut[i] = static_cast<uint16_t>(u >> 16);
  }
  const __m512i table = _mm512_load_si512(lut);
  const __m512i mask = _mm512_set1_epi16(15);
  for (int64_t n = n0; n < n1; ++n) {
    // One 32-byte chunk widened once to 16-bit lanes serves both halves: the low nibbles are columns
    // 64c .. 64c+31, the high ones 64c+32 .. 64c+63.
#define HALF(bytes, high, k, acc)                                                                       \
  {                                                                                                     \
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));      \
    v = (high) ? _mm512_srli_epi16(v, 4) : _mm512_and_si512(v, mask);                                   \
    const __m512bh q = (__m512bh)_mm512_permutexvar_epi16(v, table);                                    \
    for (int64_t r = 0; r < rows; ++r)                                                                  \
      acc[r] = _mm512_dpbf16_ps(acc[r], q, (__m512bh)_mm512_loadu_si512(p.xb + (m0 + r) * p.K + (k)));  \
  }
#define FMA_SCALE(a, sc, t) _mm512_fmadd_ps(a, _mm512_set1_ps(sc), t)
    LOWBIT_ROW_LOOP(__m512, _mm512_setzero_ps(), HALF, FMA_SCALE, _mm512_reduce_add_ps)
#undef HALF
#undef FMA_SCALE
  }
}

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")) return 3;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& wpack, const at::Tensor& scales,
                     const at::Tensor& offsets, int64_t group_size, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && wpack.dim() == 2 && scales.dim() == 2 && offsets.dim() == 2,
              "int4_gemm: x [M, K], wpack [N, K/2], scales and offsets [N, G]");
  TORCH_CHECK(wpack.scalar_type() == at::kByte, "int4_gemm: wpack must be uint8");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int4_gemm: x must be float32 or bfloat16");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && offsets.scalar_type() == at::kFloat,
              "int4_gemm: scales and offsets must be float32");
  const int64_t M = x.size(0), K = x.size(1), N = wpack.size(0);
  TORCH_CHECK(K % kChunk == 0 && wpack.size(1) * 2 == K, "int4_gemm: K must be a multiple of 64 and wpack [N, K/2]");
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "int4_gemm: group_size must be a multiple of 32 dividing K");
  TORCH_CHECK(group_size == 32 || group_size % kChunk == 0, "int4_gemm: groups above 32 must be multiples of 64");
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == G && offsets.sizes() == scales.sizes(),
              "int4_gemm: scales and offsets must be [N, K / group_size]");
  const int64_t have = best_isa();
  if (isa < 0) isa = have;
  TORCH_CHECK(isa <= have, "int4_gemm: this CPU lacks the instructions of path ", isa);

  // The activations as every path reads them, prepared in plain loops (a handful of ATen ops here would cost
  // as much as the matmul itself at one row): bfloat16 bits, the same values in float32, and group sums.
  const at::Tensor xc = x.contiguous();
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(M * K + M * G + (M * K + 1) / 2));
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
  const at::Tensor w = wpack.contiguous(), s = scales.contiguous(), off = offsets.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const Problem p{xb, xf, xsum, w.data_ptr<uint8_t>(), s.data_ptr<float>(), off.data_ptr<float>(),
                  y.data_ptr<float>(), M, N, K, G, group_size};
  // Rows of W are independent: split them across threads in runs long enough to amortize the hand-off.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    switch (isa) {
      case 3: rows_avx512bf16(p, n0, n1); break;
      case 2: rows_avx512(p, n0, n1); break;
      case 1: rows_avx2(p, n0, n1); break;
      default: rows_portable(p, n0, n1);
    }
  });
  return y;
}

int64_t int4_gemm_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY(lowbit, m) {
  m.def("int4_gemm(Tensor x, Tensor wpack, Tensor scales, Tensor offsets, int group_size, int isa=-1) -> Tensor");
  m.def("int4_gemm_isa() -> int", &int4_gemm_isa);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("int4_gemm", &int4_gemm); }
