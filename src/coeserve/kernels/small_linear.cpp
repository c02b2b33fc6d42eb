// y = x @ w.T for a few rows of x (a decode step): x [M, K], w [N, K], both fp32 and contiguous.
// Each thread of torch's own OpenMP pool takes a range of weight rows and reads it as several streams
// at once, one from each part of the range: a tile holds one row of each stream in registers, reads it
// from memory once and reuses it for every row of x. One sequential stream per core leaves the memory
// system idle between the hardware prefetcher's requests (SmolLM2's matmuls at one row, bench/layout.py:
// 20.7 GB/s with 4 streams, against 17.3 for this kernel reading blocks of adjacent rows and 14.7 for
// MKL); general GEMMs, tuned for large M, do worse at these row counts.
// (After vec.h: v16, load, hsum.)

namespace {

// out[m0 .. m0+MB, n + j*stride for j < NB] in registers, over the whole of K: NB weight rows `stride`
// rows apart, each loaded once per step of 16 in K and used for all MB rows of x.
template <int MB, int NB>
void tile(const float* x, const float* w, float* out, int64_t N, int64_t K, int64_t m0, int64_t n,
          int64_t stride) {
  v16 acc[MB][NB];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) acc[i][j] = v16{};
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t k = 0; k < K16; k += 16) {
    v16 wv[NB];
    for (int j = 0; j < NB; j++) wv[j] = load(w + (n + j * stride) * K + k);
    for (int i = 0; i < MB; i++) {
      v16 xv = load(x + (m0 + i) * K + k);
      for (int j = 0; j < NB; j++) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) {
      float s = hsum(acc[i][j]);
      for (int64_t k = K16; k < K; k++) s += x[(m0 + i) * K + k] * w[(n + j * stride) * K + k];
      out[(m0 + i) * N + n + j * stride] = s;
    }
}

// All M rows of x against the NB weight rows n + j*stride: 4 at a time, then the 1-3 left in one tile.
template <int NB>
void rows(const float* x, const float* w, float* out, int64_t M, int64_t N, int64_t K, int64_t n,
          int64_t stride) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, NB>(x, w, out, N, K, m, n, stride);
  switch (M - m) {
    case 3: tile<3, NB>(x, w, out, N, K, m, n, stride); break;
    case 2: tile<2, NB>(x, w, out, N, K, m, n, stride); break;
    case 1: tile<1, NB>(x, w, out, N, K, m, n, stride); break;
  }
}

// Weight rows lo..hi as NB streams: stream j reads rows lo + j*span .. lo + (j+1)*span, then the
// rows left over one at a time. More streams keep more reads in flight, but a tile holds MB*NB sums
// and NB weight vectors in the 32 vector registers (AVX-512): one row of x takes 12 streams (24 registers),
// more rows 6 (4 rows: 31). Timed on SmolLM2's matmuls against 4 streams, these were a few per cent
// faster; 8 or more streams at 8 rows spill the tile and were slower.
template <int NB>
void streams(const float* x, const float* w, float* out, int64_t M, int64_t N, int64_t K, int64_t lo,
             int64_t hi) {
  const int64_t span = (hi - lo) / NB;
  for (int64_t r = lo; r < lo + span; r++) rows<NB>(x, w, out, M, N, K, r, span);
  for (int64_t n = lo + span * NB; n < hi; n++) rows<1>(x, w, out, M, N, K, n, 0);
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
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
#ifdef __AVX512F__
    if (M == 1)
      streams<12>(xp, wp, op, M, N, K, lo, hi);
    else
      streams<6>(xp, wp, op, M, N, K, lo, hi);
#else  // 16 registers of half the width: the counts above would spill; 4 is what was there before
    streams<4>(xp, wp, op, M, N, K, lo, hi);
#endif
  });
  return out;
}

// Declared, then implemented for CPU tensors only: torch.compile traces the op with fake tensors
// through the shape function kernels/__init__.py registers, and calls it from the compiled step.
TORCH_LIBRARY(coeserve_kernels, m) { m.def("small_linear(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(coeserve_kernels, CPU, m) { m.impl("small_linear", &small_linear); }
