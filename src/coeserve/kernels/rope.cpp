// Rotary embedding (rotate-half convention) in one pass, for eager steps: x [B, T, H, D], fp32, its
// last dim contiguous and the others of any stride (q and k are views into the fused qkv output);
// cos, sin [B, T, 1, D] contiguous, as models/common.rope_factors makes them (cos in both halves, the
// sin of the first half negated). out[..., d] = x[d] * cos[d] + x[(d + D/2) % D] * sin[d], a new
// contiguous [B, T, H, D]. torch runs it as four kernels (two multiplies, a cat, an add); a compiled
// step fuses it into its own loops and does not call this.
// (After vec.h: v16, load, store.)

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(1) && cos.size(2) == 1 && cos.size(3) == x.size(3) && x.size(3) % 2 == 0,
              "rope: x [B, T, H, D] with D even, cos and sin [B, T, 1, D]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope: fp32 only");
  TORCH_CHECK(x.stride(3) == 1 && cos.is_contiguous() && sin.is_contiguous(),
              "rope: x's last dim and cos, sin must be contiguous");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  auto out = at::empty({B, T, H, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* spp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * T, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t bt = lo; bt < hi; bt++) {
      const float* c = cp + bt * D;
      const float* s = spp + bt * D;
      for (int64_t h = 0; h < H; h++) {
        const float* a = xp + (bt / T) * sb + (bt % T) * st + h * sh;
        float* o = op + (bt * H + h) * D;
        int64_t d = 0;
        if (half % 16 == 0) {
          for (; d < half; d += 16) {
            store(o + d, load(a + d) * load(c + d) + load(a + d + half) * load(s + d));
            store(o + half + d, load(a + half + d) * load(c + half + d) + load(a + d) * load(s + half + d));
          }
        }
        for (; d < half; d++) {
          o[d] = a[d] * c[d] + a[d + half] * s[d];
          o[half + d] = a[half + d] * c[half + d] + a[d] * s[half + d];
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(coeserve_kernels, m) { m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor"); }
TORCH_LIBRARY_IMPL(coeserve_kernels, CPU, m) { m.impl("rope", &rope); }
