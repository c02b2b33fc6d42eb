// Attention of one new token per sequence (a decode step) over that sequence's keys and values in the
// KV cache, read in place: q [B, H, D]; k_cache, v_cache [slots, Hkv, max_len, D] (a layer's whole
// cache); slots, positions [B] int64. The query of row b sees keys 0..positions[b] of slot slots[b]
// (the last `window` of them when window > 0), with scores scaled by `scale` and, when softcap > 0,
// soft-capped to softcap * tanh(s / softcap); query head h reads kv head h / (H / Hkv). Out [B, H * D].
// fp32. On a SmolLM2 batch-1 step SDPA took about 100 us a layer, mostly set-up; this about 36, with no
// mask to build and no gather of the keys when the batch's slots are not a range.
// (After vec.h: v16, load, store, hsum.)
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
  if (D >= 16) {
    v16 acc = load(a) * load(b);
    for (d = 16; d + 16 <= D; d += 16) acc += load(a + d) * load(b + d);
    s = hsum(acc);
  }
  for (; d < D; d++) s += a[d] * b[d];
  return s;
}

inline void axpy(float* o, float a, const float* x, int64_t D) {  // o += a * x
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) store(o + d, load(o + d) + a * load(x + d));
  for (; d < D; d++) o[d] += a * x[d];
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& positions, int64_t window,
                            double scale, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
              q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(1) == 0,
              "decode_attention: q [B, H, D], caches [slots, Hkv, max_len, D] with H a multiple of Hkv");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "decode_attention: fp32 only");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "decode_attention: contiguous tensors only");
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
              slots.numel() == q.size(0) && positions.numel() == q.size(0),
              "decode_attention: slots and positions: one int64 per row");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t S = k_cache.size(0), Hkv = k_cache.size(1), L = k_cache.size(2), rep = H / Hkv;
  auto slot_c = slots.contiguous();
  auto pos_c = positions.contiguous();
  const int64_t* sp = slot_c.data_ptr<int64_t>();
  const int64_t* pp = pos_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++)
    TORCH_CHECK(sp[b] >= 0 && sp[b] < S && pp[b] >= 0 && pp[b] < L,
                "decode_attention: slot or position out of the cache");
  auto out = at::empty({B, H * D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> s;
    for (int64_t bh = lo; bh < hi; bh++) {
      const int64_t b = bh / H, h = bh % H, p = pp[b];
      const int64_t j0 = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      const float* qv = qp + bh * D;
      const float* K = kp + (sp[b] * Hkv + h / rep) * L * D;
      const float* V = vp + (sp[b] * Hkv + h / rep) * L * D;
      s.resize(p - j0 + 1);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = j0; j <= p; j++) {
        float x = dot(qv, K + j * D, D) * sc;
        if (cap > 0.f) x = cap * std::tanh(x / cap);
        s[j - j0] = x;
        top = std::max(top, x);
      }
      float total = 0.f;
      for (auto& x : s) total += (x = std::exp(x - top));
      float* o = op + bh * D;
      std::fill(o, o + D, 0.f);
      for (int64_t j = j0; j <= p; j++) axpy(o, s[j - j0] / total, V + j * D, D);
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(coeserve_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor positions, "
        "int window, float scale, float softcap) -> Tensor");
}
TORCH_LIBRARY_IMPL(coeserve_kernels, CPU, m) { m.impl("decode_attention", &decode_attention); }
