// A few rows of activations times a 16-bit weight as stored (a decode step's unquantized Linears and lm_head).
//
//   x       [M, K]   bfloat16 or float16 (M small: a decode step's rows)
//   weight  [N, K]   x's dtype; any row stride, unit stride along K (an nn.Linear's weight, a tied embedding)
//   bias    [N]      optional, x's dtype
//   out     [M, N]   x's dtype:  out[m, n] = round(Σ_k x[m, k] · weight[n, k] + bias[n])
//
// Why a kernel of our own: at M = 1 the matmul only streams the weight, and PyTorch's 16-bit CPU matmuls do not
// stream it at memory speed on every CPU (the default model's bfloat16 lm_head, 57 MB: 5.5-6.5 ms per token on an
// AMD EPYC Zen 4 whose memory reads 27-30 GB/s, 1.9 ms with this kernel; BENCHMARKS.md, "A decoded token's
// bfloat16 matmuls").
//
// Arithmetic: each product of two 16-bit values is exact in float32 (8 or 11 significant bits each); the sums are
// float32, the bias added in float32, the output rounded once. So the result equals PyTorch's to 16-bit rounding,
// not bit for bit (its summation order is its own). Each output is summed by one thread in a fixed order: the
// result does not depend on the thread count. The instruction-set paths add in different orders and agree to
// float32 rounding.
//
// Paths (`isa`: 2 AVX-512, 1 AVX2, 0 portable, -1 the best this CPU has):
//   bfloat16: a widened bfloat16 is its bits shifted up by 16, so one 32-bit lane holding elements 2i and 2i+1
//   yields both as float32 with one shift and one mask; the activations are widened once per call into their
//   even and odd elements, and each weight row is read once, sequentially (one stream per thread: on an AMD EPYC
//   Zen 4, rows read side by side in 64-byte steps streamed 1.3-2x slower than one at a time; BENCHMARKS.md).
//   float16: F16C's conversion of 8 or 16 values at a time.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 16;   // activation rows per call: a decode step's, not a prompt's

inline float bf16_to_float(uint16_t bits) {
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

inline float f16_to_float(uint16_t bits) {
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

inline uint16_t float_to_bf16(float f) {   // round to nearest even, NaN kept quiet (as c10::BFloat16 does)
  return c10::BFloat16(f).x;
}

// The n halves at w[k..] with the row's end (K) zero-filled: a step past the last whole one reads this copy.
inline const uint16_t* padded(const uint16_t* w, int64_t k, int64_t K, int64_t n, uint16_t* buf) {
  if (k + n <= K) return w + k;
  std::memset(buf, 0, n * 2);
  std::memcpy(buf, w + k, (K - k) * 2);
  return buf;
}

// --- bfloat16 --------------------------------------------------------------------------------------------------

float dot_bf16_portable(const uint16_t* w, const float* xe, const float* xo, int64_t K) {
  float s = 0.0f;
  for (int64_t i = 0; 2 * i < K; ++i) {
    s += bf16_to_float(w[2 * i]) * xe[i];
    if (2 * i + 1 < K) s += bf16_to_float(w[2 * i + 1]) * xo[i];
  }
  return s;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 weights (32 bytes) per step; a tail of fewer is read from a zero-filled copy
float dot_bf16_avx2(const uint16_t* w, const float* xe, const float* xo, int64_t K) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  const int64_t full = K / 16 * 16;
  int64_t k = 0;
  for (; k + 32 <= full; k += 32) {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16));
    a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(xe + k / 2), a0);
    a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, hi)), _mm256_loadu_ps(xo + k / 2), a1);
    a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), _mm256_loadu_ps(xe + k / 2 + 8), a2);
    a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, hi)), _mm256_loadu_ps(xo + k / 2 + 8), a3);
  }
  alignas(32) uint16_t tail[16];
  for (; k < K; k += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(padded(w, k, K, 16, tail)));
    a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xe + k / 2), a0);
    a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), _mm256_loadu_ps(xo + k / 2), a1);
  }
  return sum8(_mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3)));
}

float dot_f16_avx2(const uint16_t* w, const float* x, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
    const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8)));
    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
  }
  alignas(16) uint16_t tail[8];
  for (; k < K; k += 8) {
    const auto* src = reinterpret_cast<const __m128i*>(padded(w, k, K, 8, tail));
    a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(src)),
                         _mm256_loadu_ps(x + k), a0);
  }
  return sum8(_mm256_add_ps(a0, a1));
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
// 32 weights (64 bytes) per step, the tail through a masked load
float dot_bf16_avx512(const uint16_t* w, const float* xe, const float* xo, int64_t K) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512i v0 = _mm512_loadu_si512(w + k);
    const __m512i v1 = _mm512_loadu_si512(w + k + 32);
    a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)), _mm512_loadu_ps(xe + k / 2), a0);
    a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v0, hi)), _mm512_loadu_ps(xo + k / 2), a1);
    a2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)), _mm512_loadu_ps(xe + k / 2 + 16), a2);
    a3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v1, hi)), _mm512_loadu_ps(xo + k / 2 + 16), a3);
  }
  for (; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    const __m512i v = _mm512_maskz_loadu_epi16(m, w + k);
    a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_loadu_ps(xe + k / 2), a0);
    a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), _mm512_loadu_ps(xo + k / 2), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
}

float dot_f16_avx512(const uint16_t* w, const float* x, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
    const __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16)));
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), a1);
  }
  for (; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w + k));
    a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + k), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#pragma GCC pop_options

float dot_f16_portable(const uint16_t* w, const float* x, int64_t K) {
  float s = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    s += f16_to_float(w[k]) * x[k];
  }
  return s;
}

int64_t best_path() {
  static const int64_t level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
    return 0;
  }();
  return level;
}

at::Tensor dense16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "dense16_linear: x must be [M, K] and weight [N, K]");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "dense16_linear: CPU tensors only");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "dense16_linear: bfloat16 or float16, not ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, "dense16_linear: x and weight must share a dtype");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "dense16_linear: weight has ", weight.size(1), " columns, x ", K);
  TORCH_CHECK(M <= kMaxRows, "dense16_linear: at most ", kMaxRows, " rows of activations, not ", M);
  TORCH_CHECK(weight.stride(1) == 1 || K <= 1, "dense16_linear: the weight's rows must be contiguous");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == dtype && bias->device().is_cpu(),
                "dense16_linear: bias must be [", N, "] in x's dtype");
  }
  const int64_t path = isa < 0 ? best_path() : std::min(isa, best_path());
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const bool bf16 = dtype == at::kBFloat16;

  // the activations widened to float32 once (exact), padded with zeros to whole steps of 64 halves
  const auto xc = x.contiguous();
  const auto* px = reinterpret_cast<const uint16_t*>(xc.const_data_ptr());
  const int64_t P = (K + 63) / 64 * 64;
  std::vector<float> xe(bf16 ? M * P / 2 : 0, 0.0f), xo(bf16 ? M * P / 2 : 0, 0.0f), xp(bf16 ? 0 : M * P, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const uint16_t b = px[m * K + k];
      if (bf16) {
        (k % 2 ? xo : xe)[m * P / 2 + k / 2] = bf16_to_float(b);
      } else {
        xp[m * P + k] = f16_to_float(b);
      }
    }
  }
  // the bias widened once, where there is one (an lm_head has none: nothing to fill or add per call)
  const auto bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* pb = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  const auto* pw = reinterpret_cast<const uint16_t*>(weight.const_data_ptr());
  const int64_t ldw = weight.stride(0);
  auto* po = reinterpret_cast<uint16_t*>(out.data_ptr());
  // a thread's share is at least ~64 KB of weights: less does not pay for handing it over
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* w = pw + n * ldw;
      for (int64_t m = 0; m < M; ++m) {
        float s;
        if (bf16) {
          const float* e = xe.data() + m * P / 2;
          const float* o = xo.data() + m * P / 2;
          s = path == 2 ? dot_bf16_avx512(w, e, o, K) : path == 1 ? dot_bf16_avx2(w, e, o, K)
                                                                 : dot_bf16_portable(w, e, o, K);
        } else {
          const float* xr = xp.data() + m * P;
          s = path == 2 ? dot_f16_avx512(w, xr, K) : path == 1 ? dot_f16_avx2(w, xr, K) : dot_f16_portable(w, xr, K);
        }
        if (pb) s += pb[n];
        if (bf16) {
          po[m * N + n] = float_to_bf16(s);
        } else {
          po[m * N + n] = at::Half(s).x;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("dense16_linear(Tensor x, Tensor weight, Tensor? bias=None, int isa=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("dense16_linear", &dense16_linear);
}
