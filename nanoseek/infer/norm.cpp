// RMSNorm on CPU, forward and backward, fp32 and bf16 (math in fp32), one pass over the rows each way:
//   y = x r w,  r = 1 / sqrt(mean(x^2) + eps)   (bf16: y = bf16(bf16(x r) w), the reference's two roundings)
//   dx = r (g w) - x r^3 mean(g w x),  dw = sum over rows of g (x r)
// where PyTorch's CPU rms_norm is a composite of ~6 ops forward and ~10 back (2.7 ms forward + backward
// on [2048, 128] fp32 here, against 0.2 ms for these). Registered as torch.ops.nanoseek.rms_norm_fwd /
// rms_norm_bwd; nanoseek/model/attention.py: RMSNorm calls them through kernels.py once installed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

// x r rounded as the output dtype rounds it (bf16: the reference normalises in fp32, then casts)
template <typename T>
inline vf normalised(vf x, float r) {
  const vf n = x * r;
  if constexpr (std::is_same_v<T, float>) {
    return n;
  } else {
    uint16_t buf[W];
    store_bf16(buf, n);
    return bf16_to_f32(reinterpret_cast<const uint8_t*>(buf));
  }
}

inline float hadd(vf v) {
  float t = 0.f;
  for (int w = 0; w < W; ++w) t += v[w];
  return t;
}

template <typename T>
inline float row_rstd(const T* __restrict x, int64_t D, float eps) {
  vf ss{};
  for (int64_t i = 0; i < D; i += W) {
    const vf v = load_n(x + i, std::min<int64_t>(W, D - i));
    ss += v * v;
  }
  return 1.f / std::sqrt(hadd(ss) / D + eps);
}

template <typename T>
void fwd(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& y, at::Tensor& rstd) {
  const int64_t R = x.size(0), D = x.size(1), sx = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xp + r * sx;
      const float rs = rp[r] = row_rstd(xr, D, static_cast<float>(eps));
      for (int64_t i = 0; i < D; i += W) {
        const int64_t n = std::min<int64_t>(W, D - i);
        store_n(yp + r * D + i, normalised<T>(load_n(xr + i, n), rs) * load_n(wp + i, n), n);
      }
    }
  });
}

// rows [r0, r1): dx, and their part of dw added into acc [D]
template <typename T>
void bwd_rows(const T* g, const T* x, const T* w, const float* rstd, T* dx, float* acc, int64_t r0, int64_t r1,
              int64_t D, int64_t sg, int64_t sx) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* gr = g + r * sg;
    const T* xr = x + r * sx;
    const float rs = rstd[r];
    vf dotv{};
    for (int64_t i = 0; i < D; i += W) {
      const int64_t n = std::min<int64_t>(W, D - i);
      const vf gv = load_n(gr + i, n), xv = load_n(xr + i, n);
      dotv += gv * load_n(w + i, n) * xv;
      if (acc) store_n(acc + i, load_n(acc + i, n) + gv * normalised<T>(xv, rs), n);
    }
    const float c = hadd(dotv) * rs * rs * rs / D;
    for (int64_t i = 0; i < D; i += W) {
      const int64_t n = std::min<int64_t>(W, D - i);
      const vf gv = load_n(gr + i, n), xv = load_n(xr + i, n);
      store_n(dx + r * D + i, gv * load_n(w + i, n) * rs - xv * c, n);
    }
  }
}

template <typename T>
void bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd, at::Tensor& dx,
         at::Tensor& dw) {
  const int64_t R = x.size(0), D = x.size(1);
  // dw sums over rows: each of P parts sums its rows into its own fp32 row, then the parts are added
  const int64_t P = dw.defined() ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R / 64)) : 1;
  std::vector<float> parts(dw.defined() ? P * D : 0, 0.f);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      bwd_rows<T>(g.data_ptr<T>(), x.data_ptr<T>(), w.data_ptr<T>(), rstd.data_ptr<float>(), dx.data_ptr<T>(),
                  dw.defined() ? parts.data() + p * D : nullptr, R * p / P, R * (p + 1) / P, D, g.stride(0),
                  x.stride(0));
  });
  if (dw.defined()) {
    float* out = dw.data_ptr<float>();
    for (int64_t i = 0; i < D; ++i) {
      float t = 0.f;
      for (int64_t p = 0; p < P; ++p) t += parts[p * D + i];
      out[i] = t;
    }
  }
}

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [rows, D] with contiguous rows");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(), "rms_norm: weight must be [D]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), "rms_norm: fp32 or bf16, x as w");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps) {
  check(x, w);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) fwd<float>(x, w, eps, y, rstd);
  else fwd<at::BFloat16>(x, w, eps, y, rstd);
  return {y, rstd};
}

// dw comes back in fp32 (the caller casts it to the weight's dtype); undefined when not asked
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                const at::Tensor& rstd, bool w_grad) {
  check(x, w);
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type() && g.stride(1) == 1,
              "rms_norm_bwd: g must be like x");
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = w_grad ? at::empty({x.size(1)}, x.options().dtype(at::kFloat)) : at::Tensor();
  if (x.scalar_type() == at::kFloat) bwd<float>(g, x, w, rstd, dx, dw);
  else bwd<at::BFloat16>(g, x, w, rstd, dx, dw);
  return {dx, dw};
}

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor g, Tensor x, Tensor w, Tensor rstd, bool w_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}
