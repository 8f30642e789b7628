// GPTQ's inner loop (lowbit.algorithms.gptq.round_columns) for float32 tensors on the CPU.
//
// Within one block of B columns, column i of every row is rounded to its grid, its error e is divided by the
// inverse-Hessian factor's diagonal U_ii, and the row's later columns of the block absorb it: w_j -= e·U_ij.
// Written with tensor operations that is a dozen small passes over the rows per column, tens of microseconds
// each, and a model has hundreds of thousands of columns; here each row runs through the block's columns once,
// in cache. The rows are independent given the grid and the factor, so they are split across threads.
//
// The Python loop is the reference: the same float32/float64 operations in the same order (the rounding in
// float64 as formats.base.round_to_grid does it, torch.round's ties-to-even is nearbyint under the default
// rounding mode, and the update a product and then a difference: the library is built with -ffp-contract=off),
// so the results are bit-identical (tests/test_gptq.py checks it).
//
// Layout (all float32 unless noted; rows may be strided, columns contiguous):
//   W1     [N, B]   the block's error-updated weights, updated in place (columns start.. of every row)
//   Hinv1  [B, B]   the block's part of U (upper triangular), contiguous
//   step, zero, offset  [N, n]  the grid of columns start..start+n-1: w ≈ step·(q − zero) − offset, q ∈ [lo, hi]
//   Q1 int32, U1, Err1  [N, B]  written at columns start..start+n-1: codes, the weights as rounded, e

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

struct Columns {
  float* w;
  const float* h;
  const float *step, *zero, *offset;
  int32_t* q;
  float *u, *err;
  int64_t ldw, ldg, ldq, ldu, lde;   // row strides
  int64_t B, start, n;
  double lo, hi;
};

// one row through the columns; compiled for AVX-512 and AVX2 as well, the best one chosen when loaded (the
// update loop is where the time goes, and it vectorizes without reordering anything: it is elementwise)
__attribute__((target_clones("avx512f", "avx2", "default")))
void round_row(const Columns& c, int64_t r) {
  float* w = c.w + r * c.ldw;
  const float* st = c.step + r * c.ldg;
  const float* ze = c.zero + r * c.ldg;
  const float* of = c.offset + r * c.ldg;
  for (int64_t k = 0; k < c.n; ++k) {
    const int64_t i = c.start + k;
    const float wi = w[i];
    c.u[r * c.ldu + i] = wi;
    const double s = st[k], z = ze[k], o = of[k];
    double q = std::nearbyint((static_cast<double>(wi) + o) / (s == 0 ? 1.0 : s) + z);
    q = std::min(std::max(q, c.lo), c.hi);
    if (st[k] == 0) q = std::min(std::max(z, c.lo), c.hi);   // an all-zero sub-block: one value, −offset
    c.q[r * c.ldq + i] = static_cast<int32_t>(q);
    const float dq = st[k] * (static_cast<float>(q) - ze[k]) - of[k];
    const float e = (wi - dq) / c.h[i * c.B + i];
    c.err[r * c.lde + i] = e;
    const float* hi_row = c.h + i * c.B;
    for (int64_t j = i; j < c.B; ++j) w[j] = w[j] - e * hi_row[j];
  }
}

void check(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype, "gptq_columns: ", name, " must be a CPU ",
              c10::toString(dtype), " tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "gptq_columns: ", name, " must be [",
              rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || cols <= 1, "gptq_columns: ", name, " must have contiguous rows");
}

void gptq_columns(at::Tensor W1, const at::Tensor& Hinv1, const at::Tensor& step, const at::Tensor& zero,
                  const at::Tensor& offset, int64_t lo, int64_t hi, int64_t start, at::Tensor Q1, at::Tensor U1,
                  at::Tensor Err1) {
  TORCH_CHECK(W1.dim() == 2 && step.dim() == 2, "gptq_columns: W1 and step must be 2-D");
  const int64_t N = W1.size(0), B = W1.size(1), n = step.size(1);
  TORCH_CHECK(start >= 0 && start + n <= B, "gptq_columns: columns ", start, "..", start + n, " outside the block of ", B);
  TORCH_CHECK(lo <= hi, "gptq_columns: empty code range");
  check("W1", W1, at::kFloat, N, B);
  check("Hinv1", Hinv1, at::kFloat, B, B);
  TORCH_CHECK(Hinv1.is_contiguous(), "gptq_columns: Hinv1 must be contiguous");
  check("step", step, at::kFloat, N, n);
  check("zero", zero, at::kFloat, N, n);
  check("offset", offset, at::kFloat, N, n);
  TORCH_CHECK(zero.stride(0) == step.stride(0) && offset.stride(0) == step.stride(0),
              "gptq_columns: step, zero and offset must share one layout");
  check("Q1", Q1, at::kInt, N, B);
  check("U1", U1, at::kFloat, N, B);
  check("Err1", Err1, at::kFloat, N, B);
  if (N == 0 || n == 0) return;
  const Columns c{W1.data_ptr<float>(), Hinv1.data_ptr<float>(), step.data_ptr<float>(), zero.data_ptr<float>(),
                  offset.data_ptr<float>(), Q1.data_ptr<int32_t>(), U1.data_ptr<float>(), Err1.data_ptr<float>(),
                  W1.stride(0), step.stride(0), Q1.stride(0), U1.stride(0), Err1.stride(0), B, start, n,
                  static_cast<double>(lo), static_cast<double>(hi)};
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) round_row(c, r);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("gptq_columns(Tensor(a!) W1, Tensor Hinv1, Tensor step, Tensor zero, Tensor offset, int lo, int hi, "
        "int start, Tensor(b!) Q1, Tensor(c!) U1, Tensor(d!) Err1) -> ()");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("gptq_columns", &gptq_columns);
}
