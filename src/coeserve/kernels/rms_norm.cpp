// RMSNorm of each row of x [..., D] by w [D]: x * w / sqrt(mean(x^2) + eps), fp32, contiguous. For
// eager steps, where torch's CPU rms_norm runs as half a dozen kernels and this is one pass over each
// row (an eager SmolLM2 decode step makes 61 such calls); a compiled step fuses the norm into its own
// loops and does not call this.
// (After vec.h: v16, load, store, hsum.)
#include <cmath>

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(w.dim() == 1 && x.dim() >= 1 && x.size(-1) == w.size(0), "rms_norm: x [..., D], w [D]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: fp32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "rms_norm: contiguous tensors only");
  const int64_t D = w.size(0), R = D ? x.numel() / D : 0;
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // A decode step's few rows run on the calling thread: a parallel region costs more than they do.
  at::parallel_for(0, R, 32, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
      const float* a = xp + r * D;
      float* o = op + r * D;
      int64_t d = 0;
      v16 acc{};
      for (; d + 16 <= D; d += 16) {
        v16 v = load(a + d);
        acc += v * v;
      }
      float ss = hsum(acc);
      for (; d < D; d++) ss += a[d] * a[d];
      const float scale = 1.f / std::sqrt(ss / float(D) + float(eps));
      for (d = 0; d + 16 <= D; d += 16) store(o + d, load(a + d) * scale * load(wp + d));
      for (; d < D; d++) o[d] = a[d] * scale * wp[d];
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(coeserve_kernels, m) { m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor"); }
TORCH_LIBRARY_IMPL(coeserve_kernels, CPU, m) { m.impl("rms_norm", &rms_norm); }
