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

struct QxArgs {        // gguf_make_qx, gguf_make_q3 (no w), gguf_make_qp
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

// every tile of a.rows rows across the threads, with the instruction set's version of the search
template <class Args>
void search_tiles(const Args& a, void (*wide)(const Args&, int64_t), void (*mid)(const Args&, int64_t),
                  void (*base)(const Args&, int64_t)) {
  const int isa = search_isa();
  const auto tile = isa == 2 ? wide : isa == 1 ? mid : base;
  at::parallel_for(0, (a.rows + kLanes - 1) / kLanes, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) tile(a, t * kLanes);
  });
}

using QxTile = void (*)(const QxArgs&, int64_t);

// (scale [S], codes [S, n]) of a search over the rows of x, weighted by w where the search takes weights
std::tuple<at::Tensor, at::Tensor> scale_and_codes(const char* op, const at::Tensor& x, const at::Tensor* w,
                                                   int64_t nmax, int64_t top, QxTile wide, QxTile mid,
                                                   QxTile base) {
  check_rows(op, x, w != nullptr ? *w : x);
  TORCH_CHECK(nmax >= 1 && nmax <= top, op, ": nmax must be in 1..", top);
  const at::Tensor xc = x.contiguous(), wc = w != nullptr ? w->contiguous() : xc;
  const int64_t S = x.size(0);
  at::Tensor scale = at::empty({S}, x.options());
  at::Tensor codes = at::empty({S, x.size(1)}, x.options().dtype(at::kInt));
  const QxArgs a{xc.data_ptr<float>(), wc.data_ptr<float>(), scale.data_ptr<float>(), codes.data_ptr<int32_t>(), S,
                 static_cast<int>(x.size(1)), static_cast<int>(nmax)};
  search_tiles(a, wide, mid, base);
  return {scale, codes};
}

std::tuple<at::Tensor, at::Tensor> gguf_make_qx(const at::Tensor& x, const at::Tensor& w, int64_t nmax) {
  return scale_and_codes("gguf_make_qx", x, &w, nmax, 128, avx512::qx_tile, avx2::qx_tile, baseline::qx_tile);
}

std::tuple<at::Tensor, at::Tensor> gguf_make_q3(const at::Tensor& x, int64_t nmax) {
  return scale_and_codes("gguf_make_q3", x, nullptr, nmax, 128, avx512::q3_tile, avx2::q3_tile, baseline::q3_tile);
}

std::tuple<at::Tensor, at::Tensor> gguf_make_qp(const at::Tensor& x, const at::Tensor& w, int64_t nmax) {
  return scale_and_codes("gguf_make_qp", x, &w, nmax, 255, avx512::qp_tile, avx2::qp_tile, baseline::qp_tile);
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
  search_tiles(a, avx512::qkx2_tile, avx2::qkx2_tile, baseline::qkx2_tile);
  return {scale, min, codes};
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
