// The inner searches of lowbit.formats.gguf's quantizers, for float32 rows on the CPU:
//   gguf_make_qx   = formats.gguf._make_qx   (llama.cpp's make_qx_quants: Q4_0/Q5_0/Q3_K under importance, Q6_K)
//   gguf_make_qkx2 = formats.gguf._make_qkx2 (make_qkx2_quants: Q2_K/Q4_K/Q5_K, Q4_1/Q5_1 under importance)
//   gguf_make_qp   = formats.gguf._make_qp   (make_qp_quants: Q2_K/Q4_K/Q5_K sub-block scales under importance)
//   gguf_make_q3   = formats.gguf._make_q3   (make_q3_quants: Q3_K without importance)
// The Python functions are the reference and the documentation of the algorithms; these perform the same float32
// operations in the same order (sums left to right, no fused multiply-add, llama.cpp's nearest_int bit for bit),
// so their results are bit-identical to them (tests/test_gguf_search.py checks it). Why they exist: written with
// tensor operations, each trial scale is dozens of small passes over the rows, and a model's worth of searches
// took minutes; here each row is searched once, in registers.
//
// Layout: x, w float32 [S, n] contiguous (n ≤ 64: a block or a sub-block), one search per row.
// Rows are searched 16 at a time, one row per vector lane (the row tile is transposed to [n][16] first), so that
// every operation is elementwise across lanes and the compiler vectorizes it without reordering any sum.
// The loops are written once (gguf_search.inc) and compiled for AVX-512F, AVX2 and the baseline x86-64;
// which one runs is chosen from what the CPU reports. None uses FMA: the library is built with
// -ffp-contract=off, and a contracted a·b + c would round differently from the reference.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace {

constexpr int kLanes = 16;    // rows searched together
constexpr int kMaxN = 64;     // longest row (block) searched

struct QxArgs {        // gguf_make_qx
  const float* x;
  const float* w;
  float* scale;        // [S]
  int32_t* codes;      // [S, n]
  int64_t rows;
  int n, nmax;
};

struct Qkx2Args {      // gguf_make_qkx2
  const float* x;
  const float* w;
  float* scale;        // [S]
  float* min;          // [S] (positive: w ≈ scale·L − min)
  int32_t* codes;      // [S, n]
  int64_t rows;
  int n, nmax, nstep;
  float rmin, rdelta;
  bool use_mad;
};

struct QpArgs {        // gguf_make_qp
  const float* x;
  const float* w;
  float* scale;        // [S]
  int32_t* codes;      // [S, n]
  int64_t rows;
  int n, nmax;
};

#define GGUF_SEARCH_NS avx512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
#include "gguf_search.inc"
#pragma GCC pop_options
#undef GGUF_SEARCH_NS

#define GGUF_SEARCH_NS avx2
#pragma GCC push_options
#pragma GCC target("avx2")
#include "gguf_search.inc"
#pragma GCC pop_options
#undef GGUF_SEARCH_NS

#define GGUF_SEARCH_NS baseline
#include "gguf_search.inc"
#undef GGUF_SEARCH_NS

int search_isa() {   // 2 AVX-512, 1 AVX2, 0 baseline
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return 2;
  if (__builtin_cpu_supports("avx2")) return 1;
  return 0;
}

void check_rows(const char* op, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, op, ": x and w must be float32");
  TORCH_CHECK(x.dim() == 2 && w.sizes() == x.sizes(), op, ": x and w must both be [S, n]");
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= kMaxN, op, ": rows of 1 to ", kMaxN, " values, got ", x.size(1));
}

// tiles of 16 rows per task: small enough to share 2 cores evenly on the smallest tensors
constexpr int64_t kGrain = 4;

std::tuple<at::Tensor, at::Tensor> gguf_make_qx(const at::Tensor& x, const at::Tensor& w, int64_t nmax) {
  check_rows("gguf_make_qx", x, w);
  TORCH_CHECK(nmax >= 1 && nmax <= 128, "gguf_make_qx: nmax must be in 1..128");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t S = x.size(0);
  at::Tensor scale = at::empty({S}, x.options());
  at::Tensor codes = at::empty({S, x.size(1)}, x.options().dtype(at::kInt));
  const QxArgs a{xc.data_ptr<float>(), wc.data_ptr<float>(), scale.data_ptr<float>(), codes.data_ptr<int32_t>(), S,
                 static_cast<int>(x.size(1)), static_cast<int>(nmax)};
  const int isa = search_isa();
  const int64_t tiles = (S + kLanes - 1) / kLanes;
  at::parallel_for(0, tiles, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (isa == 2) avx512::qx_tile(a, t * kLanes);
      else if (isa == 1) avx2::qx_tile(a, t * kLanes);
      else baseline::qx_tile(a, t * kLanes);
    }
  });
  return {scale, codes};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gguf_make_qkx2(const at::Tensor& x, const at::Tensor& w, int64_t nmax,
                                                              double rmin, double rdelta, int64_t nstep,
                                                              bool use_mad) {
  check_rows("gguf_make_qkx2", x, w);
  TORCH_CHECK(nmax >= 1 && nmax <= 255, "gguf_make_qkx2: nmax must be in 1..255");
  TORCH_CHECK(nstep >= 0 && nstep <= 1000, "gguf_make_qkx2: nstep must be in 0..1000");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t S = x.size(0);
  at::Tensor scale = at::empty({S}, x.options());
  at::Tensor min = at::empty({S}, x.options());
  at::Tensor codes = at::empty({S, x.size(1)}, x.options().dtype(at::kInt));
  const Qkx2Args a{xc.data_ptr<float>(), wc.data_ptr<float>(), scale.data_ptr<float>(), min.data_ptr<float>(),
                   codes.data_ptr<int32_t>(), S, static_cast<int>(x.size(1)), static_cast<int>(nmax),
                   static_cast<int>(nstep), static_cast<float>(rmin), static_cast<float>(rdelta), use_mad};
  const int isa = search_isa();
  const int64_t tiles = (S + kLanes - 1) / kLanes;
  at::parallel_for(0, tiles, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (isa == 2) avx512::qkx2_tile(a, t * kLanes);
      else if (isa == 1) avx2::qkx2_tile(a, t * kLanes);
      else baseline::qkx2_tile(a, t * kLanes);
    }
  });
  return {scale, min, codes};
}

std::tuple<at::Tensor, at::Tensor> gguf_make_q3(const at::Tensor& x, int64_t nmax) {
  check_rows("gguf_make_q3", x, x);
  TORCH_CHECK(nmax >= 1 && nmax <= 128, "gguf_make_q3: nmax must be in 1..128");
  const at::Tensor xc = x.contiguous();
  const int64_t S = x.size(0);
  at::Tensor scale = at::empty({S}, x.options());
  at::Tensor codes = at::empty({S, x.size(1)}, x.options().dtype(at::kInt));
  const QxArgs a{xc.data_ptr<float>(), nullptr, scale.data_ptr<float>(), codes.data_ptr<int32_t>(), S,
                 static_cast<int>(x.size(1)), static_cast<int>(nmax)};
  const int isa = search_isa();
  const int64_t tiles = (S + kLanes - 1) / kLanes;
  at::parallel_for(0, tiles, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (isa == 2) avx512::q3_tile(a, t * kLanes);
      else if (isa == 1) avx2::q3_tile(a, t * kLanes);
      else baseline::q3_tile(a, t * kLanes);
    }
  });
  return {scale, codes};
}

std::tuple<at::Tensor, at::Tensor> gguf_make_qp(const at::Tensor& x, const at::Tensor& w, int64_t nmax) {
  check_rows("gguf_make_qp", x, w);
  TORCH_CHECK(nmax >= 1 && nmax <= 255, "gguf_make_qp: nmax must be in 1..255");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t S = x.size(0);
  at::Tensor scale = at::empty({S}, x.options());
  at::Tensor codes = at::empty({S, x.size(1)}, x.options().dtype(at::kInt));
  const QpArgs a{xc.data_ptr<float>(), wc.data_ptr<float>(), scale.data_ptr<float>(), codes.data_ptr<int32_t>(), S,
                 static_cast<int>(x.size(1)), static_cast<int>(nmax)};
  const int isa = search_isa();
  const int64_t tiles = (S + kLanes - 1) / kLanes;
  at::parallel_for(0, tiles, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (isa == 2) avx512::qp_tile(a, t * kLanes);
      else if (isa == 1) avx2::qp_tile(a, t * kLanes);
      else baseline::qp_tile(a, t * kLanes);
    }
  });
  return {scale, codes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("gguf_make_qx(Tensor x, Tensor w, int nmax) -> (Tensor, Tensor)");
  m.def("gguf_make_qkx2(Tensor x, Tensor w, int nmax, float rmin, float rdelta, int nstep, bool use_mad) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("gguf_make_qp(Tensor x, Tensor w, int nmax) -> (Tensor, Tensor)");
  m.def("gguf_make_q3(Tensor x, int nmax) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("gguf_make_qx", &gguf_make_qx);
  m.impl("gguf_make_qkx2", &gguf_make_qkx2);
  m.impl("gguf_make_qp", &gguf_make_qp);
  m.impl("gguf_make_q3", &gguf_make_q3);
}
