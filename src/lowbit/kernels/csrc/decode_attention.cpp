// Attention of one new query per head over the cached positions (a decode step), read from the cache as stored.
//
//   q       [1, H, 1, D]   float32, bfloat16 or float16
//   keys    [1, G, T, D]   q's dtype, H % G == 0; any strides with unit stride along D (a slice of a cache)
//   values  [1, G, T, D]   likewise
//   out     [1, H, 1, D]   q's dtype; head h reads the keys and values of group h / (H / G) (grouped queries)
//
//   s_t = scale · Σ_d q_d · k_td,   p_t = exp(s_t − max_t s_t),   out_d = (Σ_t p_t · v_td) / Σ_t p_t
//
// Why a kernel of our own: with one query row, PyTorch's CPU attention (scaled_dot_product_attention, the flash
// kernel) multiplies bfloat16 through MKL's bfloat16 GEMM, and on CPUs MKL does not optimize for (AMD's) that runs
// its reference code: 60-87 µs per layer at 100 cached positions on an AMD EPYC Zen 4 (30% of a decode step of
// the default model), where this kernel takes 9 µs (BENCHMARKS.md, "Decode attention").
//
// Arithmetic: float32 from the stored values (widening a 16-bit value is exact), the scores, their exponentials and
// both sums in float32, the output rounded once to its dtype. PyTorch's bfloat16 kernel rounds the exponentials to
// bfloat16 before the weighted sum of the values; this one does not, so it is the more exact of the two, and they
// agree to bfloat16 rounding, not bit for bit. The positions are taken in spans of 128, each span's softmax sums
// kept apart and then merged in order of position (see kSpan): every sum has a fixed order, so the result does not
// depend on the thread count. The scores run 16 keys at a time and the weighted sums 4 heads x 64 dimensions at a
// time on AVX-512 (head dimensions a multiple of 16), as plain loops elsewhere; the two add in different orders, so
// they agree to float32 rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;      // partial sums of a dot product: one AVX-512 register, two AVX2 ones
constexpr int64_t kMaxDim = 1024;   // head dimensions up to this (real models: 64-256)

template <class T>
inline float widen(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    uint16_t bits;
    std::memcpy(&bits, &x, 2);
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  } else {
    return static_cast<float>(x);
  }
}

// exp(x) for x <= 0 (a score minus the row's maximum): x = n·ln2 + r with |r| <= ln2/2, exp(r) by its Taylor
// polynomial to r⁷ (remainder below 1e-8 relative), times 2^n through the exponent bits; within 1.2 float32 ulp
// of exp over [−87, 0] (checked on 2 million points). Plain float arithmetic, so that the compiler vectorizes the
// loop over positions (std::exp is a call per value). A score more than 87 below the maximum counts as exp(−87),
// about 1.6e-38, which no float32 sum of the weights (at least 1) can show.
__attribute__((target_clones("avx512f", "avx2", "default")))
void exp_nonpositive(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::max(x[i], -87.0f);
    const float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   // round to nearest: |v·log2e| < 2^22
    const float r = (v - k * 0.693145751953125f) - k * 1.42860682030941723e-06f;  // ln 2 in two parts: k·hi exact
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t e = (static_cast<int32_t>(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &e, 4);
    x[i] = p * two_k;
  }
}

// s[t] = scale · q·k_t over t < T: per key, kLanes partial sums (lane l adds d ≡ l mod kLanes), then added in a
// fixed tree; a head dimension that is not a multiple of kLanes adds its tail after.
template <class T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void scores(const float* q, const T* keys, int64_t key_stride, int64_t T_, int64_t D, float scale, float* s) {
  const int64_t body = D - D % kLanes;
  for (int64_t t = 0; t < T_; ++t) {
    const T* k = keys + t * key_stride;
    float acc[kLanes] = {};
    for (int64_t d = 0; d < body; d += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += q[d + l] * widen(k[d + l]);
    for (int64_t w = kLanes / 2; w > 0; w /= 2)
      for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
    float sum = acc[0];
    for (int64_t d = body; d < D; ++d) sum += q[d] * widen(k[d]);
    s[t] = scale * sum;
  }
}

// o[d] = Σ_t p[t] · v_td, in order of t
template <class T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void weighted_sum(const float* p, const T* values, int64_t value_stride, int64_t T_, int64_t D, float* o) {
  std::fill(o, o + D, 0.0f);
  for (int64_t t = 0; t < T_; ++t) {
    const T* v = values + t * value_stride;
    const float w = p[t];
    for (int64_t d = 0; d < D; ++d) o[d] += w * widen(v[d]);
  }
}

// The same scores on AVX-512, 16 keys at a time (head dimensions a multiple of 16): each key's products go to one
// register of 16 partial sums, and the 16 registers are added across in one tree of shuffles, leaving the 16 keys'
// sums in one register (where summing each register on its own took most of the kernel's time).
#pragma GCC push_options
#pragma GCC target("avx512f,f16c")
template <class T>
inline __m512 widen16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// out lane j = Σ lanes of v[j], j < 16
inline __m512 sum_across(__m512 v[16]) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)   // w_i: lanes 0-7 partial sums of key i, lanes 8-15 of key i + 8
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)   // x_i: quarters hold keys i, i + 8, i + 4, i + 12 (4 partial sums each)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i) {  // y_i: per quarter, 2 partial sums of x_i's key, then 2 of x_{i+2}'s
    const __m512d a = _mm512_castps_pd(x[i]), b = _mm512_castps_pd(x[i + 2]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // per quarter: the keys of x_0, x_2, x_1, x_3 in that quarter (offsets 0, 8, 4, 12 by quarter)
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, z);
}

template <class T>
int64_t scores_avx512(const float* q, const T* keys, int64_t key_stride, int64_t T_, int64_t D, float scale,
                      float* s) {
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t t = 0;
  for (; t + 16 <= T_; t += 16) {
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 qd = _mm512_loadu_ps(q + d);
      for (int j = 0; j < 16; ++j)
        acc[j] = _mm512_fmadd_ps(qd, widen16(keys + (t + j) * key_stride + d), acc[j]);
    }
    _mm512_storeu_ps(s + t, _mm512_mul_ps(sc, sum_across(acc)));
  }
  return t;   // keys done; the caller's loop takes the rest
}
#pragma GCC pop_options

// o[r][d] = Σ_t p[r][t] · v_td for the R heads of a group (p rows `ps` apart, o rows `os` apart), in order of t,
// on AVX-512 (head dimensions a multiple of 16): up to 4 heads x 64 dimensions at a time in 16 registers, each value row read once
// for all of them (the portable weighted_sum reads it once per head and keeps o in memory).
#pragma GCC push_options
#pragma GCC target("avx512f,f16c")
template <class T>
void weighted_sums_avx512(const float* p, int64_t ps, int64_t R, const T* values, int64_t value_stride, int64_t n,
                          int64_t D, float* o, int64_t os) {
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const int64_t nr = std::min<int64_t>(4, R - r0);
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int64_t nv = std::min<int64_t>(64, D - d0) / 16;
      __m512 acc[4][4];
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const T* v = values + t * value_stride + d0;
        __m512 vv[4];
        for (int j = 0; j < 4; ++j) vv[j] = j < nv ? widen16(v + 16 * j) : _mm512_setzero_ps();
        for (int r = 0; r < 4; ++r) {
          if (r >= nr) break;
          const __m512 w = _mm512_set1_ps(p[(r0 + r) * ps + t]);
          for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(w, vv[j], acc[r][j]);
        }
      }
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < nv; ++j) _mm512_storeu_ps(o + (r0 + r) * os + d0 + 16 * j, acc[r][j]);
    }
  }
}
#pragma GCC pop_options

// Work is split into items of one key/value group and up to kSpan cached positions (the last item of a group may
// hold fewer). An item computes, for each query head r of its group, over its positions only: m_r = the largest
// score, l_r = Σ exp(s − m_r), o_r = Σ exp(s − m_r) · v; decode_attention then merges a head's items in order of
// position (flash-decoding's split): M = max m, out = Σ exp(m − M) · o / Σ exp(m − M) · l.
// Why: the query heads of a group (3 per key/value head in the default model) read the same keys and values, which
// per head re-read the group's cache from memory (a 2048-position float32 cache of 3 MB outgrows the L2 caches);
// per item they are read from memory once, the other heads finding them in cache, and long caches spread over the
// threads even with fewer groups than threads. kSpan is fixed, never derived from the thread count, so the result
// does not depend on it.
constexpr int64_t kSpan = 128;

struct Partials {   // per item (group g, span c, item = g · spans + c) and head r of the group: m, l, o[D]
  float* base;
  int64_t R, D;
  float* m(int64_t item, int64_t r) const { return base + (item * R + r) * (D + 2); }
  float* l(int64_t item, int64_t r) const { return m(item, r) + 1; }
  float* o(int64_t item, int64_t r) const { return m(item, r) + 2; }
};

template <class T>
void one_item(const float* qf, int64_t R, const T* keys, int64_t key_stride, const T* values, int64_t value_stride,
              int64_t n, int64_t D, float scale, float* s, const Partials& out, int64_t item) {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
  const bool vec = avx512 && D % 16 == 0;
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * kSpan;
    const int64_t done = vec ? scores_avx512(qf + r * D, keys, key_stride, n, D, scale, sr) : 0;
    scores(qf + r * D, keys + done * key_stride, key_stride, n - done, D, scale, sr + done);
    const float top = *std::max_element(sr, sr + n);
    for (int64_t t = 0; t < n; ++t) sr[t] -= top;
    exp_nonpositive(sr, n);
    float total = 0.0f;
    for (int64_t t = 0; t < n; ++t) total += sr[t];
    *out.m(item, r) = top;
    *out.l(item, r) = total;
    if (!vec) weighted_sum(sr, values, value_stride, n, D, out.o(item, r));
  }
  if (vec)   // the R heads' sums in one pass over the values, straight into their o (D + 2 floats apart)
    weighted_sums_avx512(s, kSpan, R, values, value_stride, n, D, out.o(item, 0), D + 2);
}

// Head r of group g from its items' partials, in order of position.
template <class T>
void merge_head(const Partials& part, int64_t g, int64_t spans, int64_t r, int64_t D, T* out) {
  float w[kMaxDim], o[kMaxDim];
  float top = -INFINITY;
  for (int64_t c = 0; c < spans; ++c) top = std::max(top, *part.m(g * spans + c, r));
  std::fill(o, o + D, 0.0f);
  float total = 0.0f;
  for (int64_t c0 = 0; c0 < spans; c0 += kMaxDim) {   // the items' weights exp(m − M), kMaxDim at a time
    const int64_t nc = std::min<int64_t>(kMaxDim, spans - c0);
    for (int64_t c = 0; c < nc; ++c) w[c] = *part.m(g * spans + c0 + c, r) - top;
    exp_nonpositive(w, nc);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t item = g * spans + c0 + c;
      total += w[c] * *part.l(item, r);
      const float* oc = part.o(item, r);
      for (int64_t d = 0; d < D; ++d) o[d] += w[c] * oc[d];
    }
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(o[d] / total);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4,
              "decode_attention: q, keys and values must be [1, heads, positions, head_dim]");
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(),
              "decode_attention: q, keys and values must share a dtype");
  const int64_t H = q.size(1), G = keys.size(1), T_ = keys.size(2), D = q.size(3);
  TORCH_CHECK(q.size(0) == 1 && keys.size(0) == 1 && values.size(0) == 1 && q.size(2) == 1,
              "decode_attention: one sequence and one query position");
  TORCH_CHECK(G > 0 && H % G == 0 && values.size(1) == G, "decode_attention: heads must be a multiple of the ",
              "key/value heads");
  TORCH_CHECK(keys.size(3) == D && values.size(3) == D && values.size(2) == T_ && T_ > 0,
              "decode_attention: keys and values must be [1, ", G, ", T > 0, ", D, "]");
  TORCH_CHECK(D <= kMaxDim, "decode_attention: head dimension ", D, " above ", kMaxDim);
  TORCH_CHECK(q.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1,
              "decode_attention: the head dimension must be contiguous");
  auto out = at::empty({1, H, 1, D}, q.options());
  const int64_t R = H / G, spans = (T_ + kSpan - 1) / kSpan, items = G * spans;
  std::vector<float> partials(static_cast<size_t>(items * R * (D + 2)));
  const Partials part{partials.data(), R, D};
  // a run of items per thread holds at least ~16K multiply-adds: fewer are not worth a thread's hand-off
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, R * std::min(T_, kSpan) * D));
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    const T* pq = reinterpret_cast<const T*>(q.const_data_ptr());
    const T* pk = reinterpret_cast<const T*>(keys.const_data_ptr());
    const T* pv = reinterpret_cast<const T*>(values.const_data_ptr());
    T* po = reinterpret_cast<T*>(out.data_ptr());
    at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> s(static_cast<size_t>(R * kSpan)), qf(static_cast<size_t>(R * D));
      int64_t widened = -1;   // the group whose queries qf holds
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t g = item / spans, t0 = (item % spans) * kSpan, n = std::min(kSpan, T_ - t0);
        if (g != widened) {
          for (int64_t r = 0; r < R; ++r)
            for (int64_t d = 0; d < D; ++d) qf[r * D + d] = widen(pq[(g * R + r) * q.stride(1) + d]);
          widened = g;
        }
        one_item(qf.data(), R, pk + g * keys.stride(1) + t0 * keys.stride(2), keys.stride(2),
                 pv + g * values.stride(1) + t0 * values.stride(2), values.stride(2), n, D,
                 static_cast<float>(scale), s.data(), part, item);
      }
    });
    at::parallel_for(0, H, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, spans * D)), [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) merge_head(part, h / R, spans, h % R, D, po + h * D);
    });
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(0.0f); break;
    case at::kBFloat16: run(at::BFloat16(0.0f)); break;
    case at::kHalf: run(at::Half(0.0f)); break;
    default: TORCH_CHECK(false, "decode_attention: float32, bfloat16 or float16, not ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
