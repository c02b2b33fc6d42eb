// y = x @ w.T for a few rows of x (a decode batch): x [M, K], w [N, K], both fp32 and contiguous.
// Each thread of torch's own OpenMP pool takes blocks of 4 weight rows; a block is read from memory once
// and reused from cache for every 4 rows of x, so the step streams the weights at close to memory speed
// where a general GEMM, tuned for large M, does not. GCC vector types compile to the machine's widest
// vectors (-march=native): AVX-512 or AVX2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cstring>

namespace {

typedef float v16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(v16 v) {
  float s = 0;
  for (int i = 0; i < 16; i++) s += v[i];
  return s;
}

// out[m0 .. m0+MB, n .. n+NB] in registers, over the whole of K.
template <int MB, int NB>
void tile(const float* x, const float* w, float* out, int64_t N, int64_t K, int64_t m0, int64_t n) {
  v16 acc[MB][NB];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) acc[i][j] = v16{};
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t k = 0; k < K16; k += 16) {
    v16 wv[NB];
    for (int j = 0; j < NB; j++) wv[j] = load(w + (n + j) * K + k);
    for (int i = 0; i < MB; i++) {
      v16 xv = load(x + (m0 + i) * K + k);
      for (int j = 0; j < NB; j++) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) {
      float s = hsum(acc[i][j]);
      for (int64_t k = K16; k < K; k++) s += x[(m0 + i) * K + k] * w[(n + j) * K + k];
      out[(m0 + i) * N + n + j] = s;
    }
}

}  // namespace

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "small_linear: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "small_linear: fp32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "small_linear: contiguous tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int NB = 4;
  at::parallel_for(0, N / NB, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) tile<4, NB>(xp, wp, op, N, K, m, b * NB);
      for (; m < M; m++) tile<1, NB>(xp, wp, op, N, K, m, b * NB);
    }
  });
  for (int64_t n = N / NB * NB; n < N; n++)
    for (int64_t m = 0; m < M; m++) tile<1, 1>(xp, wp, op, N, K, m, n);
  return out;
}

TORCH_LIBRARY(coeserve_kernels, m) { m.def("small_linear(Tensor x, Tensor w) -> Tensor", &small_linear); }
