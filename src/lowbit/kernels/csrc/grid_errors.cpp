// The error of each candidate grid in the weighted range search of integer groups (lowbit.formats.intq.
// search_qparams), for float32 tensors on the CPU.
//
// For every row n, group g and candidate r:  err = Σ_j imp_j · ((clamp(round(w_j / s + z), qmin, qmax) − z) · s − w_j)²
// with s = step[r, n, g], z = zero[r, n, g]. As tensor operations that is a dozen passes over the whole weight
// per candidate (21 candidates); here each group's weights are read once for all candidates.
//
// The tensor code (intq.grid_errors) is the reference: the same float32 operations in the same order (a
// division, a sum, ties-to-even rounding (nearbyint under the default rounding mode), a clamp, a difference, a
// product, a difference, a square, a product; the library is built with -ffp-contract=off), and the sum over
// the group in ATen's own order for its vector width (below), so the results are bit-identical to the tensor
// code's `.sum(-1)` (intq.sum_width checks it on this ATen first; tests/test_formats.py).
//
// Layout (float32, contiguous): w [N, G, g], imp [G, g] (the importance of each column), step and zero [R, N, G];
// returns err [R, N, G].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// ATen's float sum over a contiguous row of n values (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum;
// written out in Python in lowbit.engine.reduction, which documents it), for vectors of W floats: n >= W: the
// n / W vectors summed by row_sum, then the n % W trailing values and the W lanes added in order; n < W:
// row_sum over the single values. The caller checks W against the installed ATen (intq.sum_width).
struct Acc {
  float* v;
  bool has = false;
  void add(const float* x, int64_t lanes) {   // None + x == x, as ATen's zeroed accumulator gives for x >= 0
    for (int64_t l = 0; l < lanes; ++l) v[l] = has ? v[l] + x[l] : x[l];
    has = true;
  }
};

inline int64_t ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(x - 1)); }

// rows of `width` floats each (R of them, `row` apart): multi_row_sum's running sums flushed through 4 levels
void multi_row_sum(const float* x, int64_t R, int64_t width, float* work, float* out) {
  constexpr int kLevels = 4;
  const int64_t power = std::max<int64_t>(4, ceil_log2(R) / kLevels), step = int64_t(1) << power, mask = step - 1;
  Acc acc[kLevels] = {{work}, {work + width}, {work + 2 * width}, {work + 3 * width}};
  int64_t i = 0;
  while (i + step <= R) {
    for (int64_t k = 0; k < step; ++k, ++i) acc[0].add(x + i * width, width);
    for (int j = 1; j < kLevels; ++j) {
      if (acc[j - 1].has) {
        acc[j].add(acc[j - 1].v, width);
        acc[j - 1].has = false;
      }
      if (i & (mask << (j * power))) break;
    }
  }
  for (; i < R; ++i) acc[0].add(x + i * width, width);
  for (int j = 1; j < kLevels; ++j)
    if (acc[j].has) acc[0].add(acc[j].v, width);
  std::copy(acc[0].v, acc[0].v + width, out);
}

// m items of `lanes` values: row_sum's 4 columns (rows of 4 items through multi_row_sum, the trailing items into
// column 0, then columns 1..3 into column 0); out [lanes]
void row_sum(const float* x, int64_t m, int64_t lanes, float* work, float* out) {
  constexpr int64_t kIlp = 4;
  const int64_t rows = m / kIlp;
  float* total = work;                          // [kIlp * lanes]
  float* inner = work + kIlp * lanes;           // multi_row_sum's levels
  Acc cols[kIlp] = {{total}, {total + lanes}, {total + 2 * lanes}, {total + 3 * lanes}};
  if (rows) {
    multi_row_sum(x, rows, kIlp * lanes, inner, total);
    for (auto& c : cols) c.has = true;
  }
  for (int64_t i = rows * kIlp; i < m; ++i) cols[0].add(x + i * lanes, lanes);
  for (int64_t k = 1; k < kIlp; ++k)
    if (cols[k].has) cols[0].add(cols[k].v, lanes);
  std::copy(total, total + lanes, out);
}

// work: at least 5 · 4 · W + W floats
inline float aten_sum(const float* x, int64_t n, int64_t W, float* work) {
  float* vec = work;
  if (n < W) {
    row_sum(x, n, 1, work + W, vec);
    return vec[0];
  }
  const int64_t vectors = n / W;
  row_sum(x, vectors, W, work + W, vec);
  Acc total{work + W};
  for (int64_t k = vectors * W; k < n; ++k) total.add(x + k, 1);
  for (int64_t l = 0; l < W; ++l) total.add(vec + l, 1);
  return total.v[0];
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void group_terms(const float* w, const float* imp, float s, float z, float lo, float hi, float* t, int64_t g) {
  for (int64_t j = 0; j < g; ++j) {
    const float q = std::min(std::max(std::nearbyint(w[j] / s + z), lo), hi);
    const float e = (q - z) * s - w[j];
    t[j] = imp[j] * (e * e);
  }
}

at::Tensor grid_errors(const at::Tensor& w, const at::Tensor& imp, const at::Tensor& step, const at::Tensor& zero,
                       double qmin, double qmax, int64_t width) {
  TORCH_CHECK(width >= 1 && width <= 64, "grid_errors: width must be 1..64");
  TORCH_CHECK(w.dim() == 3 && imp.dim() == 2 && step.dim() == 3 && zero.sizes() == step.sizes(),
              "grid_errors: w [N, G, g], imp [G, g], step and zero [R, N, G]");
  TORCH_CHECK(w.scalar_type() == at::kFloat && imp.scalar_type() == at::kFloat && step.scalar_type() == at::kFloat &&
              zero.scalar_type() == at::kFloat, "grid_errors: float32 tensors");
  const int64_t N = w.size(0), G = w.size(1), g = w.size(2), R = step.size(0);
  TORCH_CHECK(imp.size(0) == G && imp.size(1) == g && step.size(1) == N && step.size(2) == G,
              "grid_errors: shapes do not match");
  const at::Tensor wc = w.contiguous(), ic = imp.contiguous(), sc = step.contiguous(), zc = zero.contiguous();
  at::Tensor err = at::empty({R, N, G}, w.options());
  const float *wp = wc.data_ptr<float>(), *ip = ic.data_ptr<float>(), *sp = sc.data_ptr<float>(),
              *zp = zc.data_ptr<float>();
  float* ep = err.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> t(static_cast<size_t>(g)), work(static_cast<size_t>(21 * width + 16));
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < G; ++k)
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = (r * N + n) * G + k;
          group_terms(wp + (n * G + k) * g, ip + k * g, sp[i], zp[i], lo, hi, t.data(), g);
          ep[i] = aten_sum(t.data(), g, width, work.data());
        }
  });
  return err;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("grid_errors(Tensor w, Tensor imp, Tensor step, Tensor zero, float qmin, float qmax, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("grid_errors", &grid_errors); }
