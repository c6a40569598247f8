// Feed-forward kernels for training and inference on CPU, fp32 and bf16 (math in fp32):
//   swiglu_fwd / swiglu_bwd   h = silu(g) * u (* rw per row), one pass each way where eager PyTorch
//                             makes five (silu, mul, mul; silu_backward, muls, and a cat of the two
//                             halves' gradients); g and u may be the strided halves of one
//                             [rows, 2I] GEMM output, and the gradient comes back as one [rows, 2I].
//   moe_route / moe_route_bwd DeepSeek's gate after its GEMM: affinities (sigmoid or softmax), the
//                             biased, group-limited top-k choice, the normalised and scaled weights;
//                             a token's E experts are a few dozen floats, so one task per token
//                             replaces ~20 small ops over [N, E] tensors (nanoseek/model/moe.py: Gate).
//   gate_logits / _bwd        the gate's GEMM, x [N, H] · w [E, H]^T in fp32 for fp32 or bf16 x and w: E is
//                             a few experts, a product so thin that a GEMM library runs it at a
//                             fraction of its speed (and a bf16 layer would first copy x to fp32).
//   moe_plan                  the (token, expert) pairs sorted by expert, by a counting sort (stable,
//                             as argsort(stable=True)), each expert's slice padded to a multiple of
//                             `pad` rows (nanoseek/model/moe.py: sort_pairs).
// Registered as torch.ops.nanoseek.*, built with kernels.cpp into one library (kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

static void check_pair(const at::Tensor& g, const at::Tensor& u) {
  TORCH_CHECK(g.dim() == 2 && u.sizes() == g.sizes(), "swiglu: g and u must be [rows, I] of one shape");
  TORCH_CHECK(g.scalar_type() == u.scalar_type() &&
              (g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16), "swiglu: fp32 or bf16");
  TORCH_CHECK(g.stride(1) == 1 && u.stride(1) == 1, "swiglu: rows must be contiguous");
}

// rw as R fp32 numbers (or none: 1)
static at::Tensor row_weights(const c10::optional<at::Tensor>& rw, int64_t R) {
  if (!rw.has_value() || !rw->defined()) return at::Tensor();
  TORCH_CHECK(rw->numel() == R, "swiglu: rw must hold one weight per row");
  return rw->reshape({R}).to(at::kFloat).contiguous();
}

// one row; raw restrict pointers, so the loop keeps everything in registers
template <typename T>
static inline void swiglu_row(const T* __restrict g, const T* __restrict u, T* __restrict h, int64_t I, float a) {
  for (int64_t i = 0; i < I; i += W) {
    const int64_t n = std::min<int64_t>(W, I - i);
    const vf x = load_n(g + i, n), y = load_n(u + i, n);
    store_n(h + i, x * sigmoid_v(x) * y * a, n);
  }
}

template <typename T>
static void swiglu_fwd_impl(const at::Tensor& g, const at::Tensor& u, const at::Tensor& rw, at::Tensor& h) {
  const int64_t R = g.size(0), I = g.size(1), sg = g.stride(0), su = u.stride(0);
  const T* gp = g.data_ptr<T>();
  const T* up = u.data_ptr<T>();
  T* hp = h.data_ptr<T>();
  const float* wp = rw.defined() ? rw.data_ptr<float>() : nullptr;
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) swiglu_row(gp + r * sg, up + r * su, hp + r * I, I, wp ? wp[r] : 1.f);
  });
}

at::Tensor swiglu_fwd(const at::Tensor& g, const at::Tensor& u, const c10::optional<at::Tensor>& rw) {
  check_pair(g, u);
  const at::Tensor w = row_weights(rw, g.size(0));
  at::Tensor h = at::empty(g.sizes(), g.options());
  if (g.scalar_type() == at::kFloat) swiglu_fwd_impl<float>(g, u, w, h);
  else swiglu_fwd_impl<at::BFloat16>(g, u, w, h);
  return h;
}

// dg = dh rw u s (1 + g (1 - s)), du = dh rw g s (s = sigmoid(g)), written side by side into one
// [R, 2I] row; returns sum_i dh g s u (the gradient of rw)
template <typename T>
static inline float swiglu_bwd_row(const T* __restrict d, const T* __restrict g, const T* __restrict u,
                                   T* __restrict out, int64_t I, float a) {
  vf acc{};
  for (int64_t i = 0; i < I; i += W) {
    const int64_t n = std::min<int64_t>(W, I - i);
    const vf x = load_n(g + i, n), y = load_n(u + i, n), dh = load_n(d + i, n);
    const vf s = sigmoid_v(x), silu = x * s;
    acc += dh * silu * y;
    store_n(out + i, dh * a * y * s * (1.f + x * (1.f - s)), n);
    store_n(out + I + i, dh * a * silu, n);
  }
  float t = 0.f;
  for (int w = 0; w < W; ++w) t += acc[w];
  return t;
}

template <typename T>
static void swiglu_bwd_impl(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u, const at::Tensor& rw,
                            at::Tensor& dgu, at::Tensor& drw) {
  const int64_t R = g.size(0), I = g.size(1), sg = g.stride(0), su = u.stride(0), sd = dh.stride(0);
  const T* gp = g.data_ptr<T>();
  const T* up = u.data_ptr<T>();
  const T* dp = dh.data_ptr<T>();
  T* op = dgu.data_ptr<T>();
  const float* wp = rw.defined() ? rw.data_ptr<float>() : nullptr;
  float* dwp = drw.defined() ? drw.data_ptr<float>() : nullptr;
  at::parallel_for(0, R, std::max<int64_t>(1, 8192 / std::max<int64_t>(I, 1)), [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float t = swiglu_bwd_row(dp + r * sd, gp + r * sg, up + r * su, op + r * 2 * I, I, wp ? wp[r] : 1.f);
      if (dwp) dwp[r] = t;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u,
                                              const c10::optional<at::Tensor>& rw, bool rw_grad) {
  check_pair(g, u);
  TORCH_CHECK(dh.sizes() == g.sizes() && dh.scalar_type() == g.scalar_type() && dh.stride(1) == 1,
              "swiglu_bwd: dh must be [rows, I] like g with contiguous rows");
  const at::Tensor w = row_weights(rw, g.size(0));
  at::Tensor dgu = at::empty({g.size(0), 2 * g.size(1)}, g.options());
  at::Tensor drw = rw_grad && w.defined() ? at::empty({g.size(0)}, g.options().dtype(at::kFloat)) : at::Tensor();
  if (g.scalar_type() == at::kFloat) swiglu_bwd_impl<float>(dh, g, u, w, dgu, drw);
  else swiglu_bwd_impl<at::BFloat16>(dh, g, u, w, dgu, drw);
  return {dgu, drw};
}

enum Method { GREEDY = 0, NOAUX_TC = 1, GROUP_LIMITED_GREEDY = 2 };

// The gate after its GEMM: logits [E] -> affinities s [E], top-k experts idx [k] (best first) and their
// weights w [k], per token. The choice ranks s + bias (bias for selection only, V3's auxiliary-loss-free
// balancing); with groups, only the topk_group groups with the highest group score (the sum of
// their top-2, or their max) compete; ties go to the lower index.
struct RouteArgs {
  int64_t E, k, n_group, topk_group, method;
  bool sigmoid, norm;
  double scaling;
};

// softmax affinities s [E] of one token's logits l (sigmoid ones are made for a block of tokens at once)
static void softmax_row(const float* l, float* s, int64_t E) {
  float mx = l[0], z = 0.f;
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
  for (int64_t e = 0; e < E; ++e) z += (s[e] = std::exp(l[e] - mx));
  for (int64_t e = 0; e < E; ++e) s[e] /= z;
}

// One token's choice from its affinities s [E]: idx [k] (best first) and their weights w [k]. The library
// is built with -ffast-math (no infinities or NaNs assumed), so masks are flags, not -inf.
static void route_token(const RouteArgs& a, const float* s, const float* bias, float* w, int64_t* idx,
                        float* choice, float* gscore, char* open) {
  for (int64_t e = 0; e < a.E; ++e) choice[e] = bias ? s[e] + bias[e] : s[e], open[e] = 1;
  if (a.n_group > 1 && a.method != GREEDY) {
    const int64_t gs = a.E / a.n_group;
    for (int64_t gi = 0; gi < a.n_group; ++gi) {
      const float* c = choice + gi * gs;
      int64_t j1 = 0, j2 = -1;  // the group's two largest
      for (int64_t j = 1; j < gs; ++j) {
        if (c[j] > c[j1]) j2 = j1, j1 = j;
        else if (j2 < 0 || c[j] > c[j2]) j2 = j;
      }
      gscore[gi] = a.method == NOAUX_TC && j2 >= 0 ? c[j1] + c[j2] : c[j1];
    }
    for (int64_t gi = 0; gi < a.n_group; ++gi) open[a.E + gi] = 0;  // kept groups, chosen below
    for (int64_t t = 0; t < a.topk_group; ++t) {
      int64_t best = -1;
      for (int64_t gi = 0; gi < a.n_group; ++gi)
        if (!open[a.E + gi] && (best < 0 || gscore[gi] > gscore[best])) best = gi;
      open[a.E + best] = 1;
    }
    for (int64_t e = 0; e < a.E; ++e) open[e] = open[a.E + e / gs];
  }
  float sum = 0.f;
  for (int64_t t = 0; t < a.k; ++t) {
    int64_t best = -1;
    for (int64_t e = 0; e < a.E; ++e)
      if (open[e] == 1 && (best < 0 || choice[e] > choice[best])) best = e;
    if (best < 0) {  // fewer open experts than k (a config the model refuses): the best closed ones
      for (int64_t e = 0; e < a.E; ++e)
        if (open[e] != 2 && (best < 0 || choice[e] > choice[best])) best = e;
    }
    idx[t] = best;
    open[best] = 2;  // taken
    sum += (w[t] = s[best]);
  }
  const float scale = static_cast<float>(a.scaling) / (a.norm ? sum + 1e-20f : 1.f);
  for (int64_t t = 0; t < a.k; ++t) w[t] *= scale;
}

// route_token for W tokens at once, one per vector lane, with no branches on the data: the same choice (ties
// to the lower index, the same sums in the same order), where route_token's loops mispredict on every new
// routing (2048 new tokens a call, 1 thread, AVX-512: 8 experts top-2 94 -> 17 ns a token, 16 top-4 322 ->
// 35, 256 top-8 3755 -> 596). Needs k <= 16 and k <= the experts in the kept groups (the config's rule;
// route_token handles fewer). s: the block's affinities [W, E]; c, gscore: E and n_group vectors of scratch.
static void route_block(const RouteArgs& a, const float* s, const float* bias, float* w, int64_t* idx, vf* c,
                        vf* gscore) {
  constexpr float CLOSED = -3e38f;  // below any affinity + bias
  const int64_t E = a.E, G = a.n_group, gs = E / G, k = a.k;
  for (int64_t e = 0; e < E; ++e) {  // lane t of c[e]: token t's biased affinity for expert e
    vf v;
    for (int t = 0; t < W; ++t) v[t] = s[t * E + e];
    c[e] = bias ? v + bias[e] : v;
  }
  if (G > 1 && a.method != GREEDY) {
    for (int64_t g = 0; g < G; ++g) {  // each group's score: the sum of its top two (noaux_tc), or its top
      vf m1 = c[g * gs], m2 = vf{} + CLOSED;
      for (int64_t j = 1; j < gs; ++j) {
        const vf v = c[g * gs + j];
        m2 = m2 > (m1 < v ? m1 : v) ? m2 : (m1 < v ? m1 : v);
        m1 = m1 > v ? m1 : v;
      }
      gscore[g] = a.method == NOAUX_TC && gs > 1 ? m1 + m2 : m1;
    }
    for (int64_t g = 0; g < G; ++g) {  // kept: fewer than topk_group groups rank above it (ties: lower index)
      vi32 rank{};
      for (int64_t h = 0; h < G; ++h)
        if (h != g) rank -= h < g ? (gscore[h] >= gscore[g]) : (gscore[h] > gscore[g]);
      const vi32 closed = rank >= static_cast<int32_t>(a.topk_group);
      for (int64_t j = 0; j < gs; ++j) c[g * gs + j] = closed ? vf{} + CLOSED : c[g * gs + j];
    }
  }
  vf wv[16], sum{};
  vi32 iv[16];
  for (int64_t t = 0; t < k; ++t) {
    vf best = c[0];
    vi32 bi{};
    for (int64_t e = 1; e < E; ++e) {
      const vi32 gt = c[e] > best;
      best = gt ? c[e] : best;
      bi = gt ? vi32{} + static_cast<int32_t>(e) : bi;
    }
    for (int64_t e = 0; e < E; ++e) c[e] = bi == static_cast<int32_t>(e) ? vf{} + CLOSED : c[e];
    for (int l = 0; l < W; ++l) wv[t][l] = s[l * E + bi[l]];
    iv[t] = bi;
    sum += wv[t];
  }
  for (int l = 0; l < W; ++l) {
    const float scale = static_cast<float>(a.scaling) / (a.norm ? sum[l] + 1e-20f : 1.f);  // as route_token's
    for (int64_t t = 0; t < k; ++t) w[l * k + t] = wv[t][l] * scale, idx[l * k + t] = iv[t][l];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route(const at::Tensor& logits,
                                                         const c10::optional<at::Tensor>& bias,
                                                         int64_t k, int64_t n_group, int64_t topk_group, int64_t method,
                                                         bool sigmoid, bool norm, double scaling) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "moe_route: logits must be [N, E] fp32");
  const at::Tensor l = logits.contiguous();
  const int64_t N = l.size(0), E = l.size(1);
  TORCH_CHECK(k >= 1 && k <= E && n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group,
              "moe_route: bad k / n_group / topk_group for E = ", E);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == E, "moe_route: bias must hold E numbers");
  }
  at::Tensor s = at::empty({N, E}, l.options()), w = at::empty({N, k}, l.options());
  at::Tensor idx = at::empty({N, k}, l.options().dtype(at::kLong));
  const RouteArgs a{E, k, n_group, topk_group, method, sigmoid, norm, scaling};
  const float* lp = l.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* sp = s.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  const bool grouped = n_group > 1 && method != GREEDY;
  const bool lanes = k <= 16 && k <= (grouped ? topk_group * (E / n_group) : E);  // route_block's conditions
  at::parallel_for(0, N, std::max<int64_t>(W, 2048 / E), [&](int64_t n0, int64_t n1) {
    std::vector<float> choice(E), gscore(n_group);
    std::vector<char> open(E + n_group);
    std::vector<vf> c(E), gv(n_group);
    if (sigmoid) {  // the affinities of the block's tokens, W at a time (E may be less than W)
      int64_t i = n0 * E;
      for (; i + W <= n1 * E; i += W) store_n(sp + i, sigmoid_v(load<vf>(lp + i)), W);
      if (i < n1 * E) store_n(sp + i, sigmoid_v(load_n(lp + i, n1 * E - i)), n1 * E - i);
    } else {
      for (int64_t n = n0; n < n1; ++n) softmax_row(lp + n * E, sp + n * E, E);
    }
    int64_t n = n0;
    if (lanes)
      for (; n + W <= n1; n += W) route_block(a, sp + n * E, bp, wp + n * k, ip + n * k, c.data(), gv.data());
    for (; n < n1; ++n)
      route_token(a, sp + n * E, bp, wp + n * k, ip + n * k, choice.data(), gscore.data(), open.data());
  });
  return {s, w, idx};
}

// d logits from the gradients of the weights dw [N, k] and of the affinities ds [N, E] (either may be
// undefined: zero). With normalisation w_j = c s_j / S (S = sum of the chosen s + 1e-20):
// dL/ds_j += c (dw_j / S - sum_i dw_i s_i / S^2) for the chosen j; then through the sigmoid
// (s (1 - s)) or the softmax (s (ds - sum_e ds_e s_e)).
at::Tensor moe_route_bwd(const c10::optional<at::Tensor>& dw_, const c10::optional<at::Tensor>& ds_,
                         const at::Tensor& scores, const at::Tensor& idx, bool sigmoid, bool norm, double scaling) {
  const int64_t N = scores.size(0), E = scores.size(1), k = idx.size(1);
  const at::Tensor s = scores.contiguous(), ix = idx.contiguous();
  const bool has_dw = dw_.has_value() && dw_->defined(), has_ds = ds_.has_value() && ds_->defined();
  const at::Tensor dw = has_dw ? dw_->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor ds = has_ds ? ds_->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor dl = at::empty({N, E}, s.options());
  const float* sp = s.data_ptr<float>();
  const int64_t* ip = ix.data_ptr<int64_t>();
  const float* dwp = has_dw ? dw.data_ptr<float>() : nullptr;
  const float* dsp = has_ds ? ds.data_ptr<float>() : nullptr;
  float* dlp = dl.data_ptr<float>();
  const float c = static_cast<float>(scaling);
  at::parallel_for(0, N, std::max<int64_t>(1, 2048 / E), [&](int64_t n0, int64_t n1) {
    std::vector<float> g(E);
    for (int64_t n = n0; n < n1; ++n) {
      const float* sn = sp + n * E;
      for (int64_t e = 0; e < E; ++e) g[e] = dsp ? dsp[n * E + e] : 0.f;
      if (dwp) {
        const int64_t* in = ip + n * k;
        const float* dwn = dwp + n * k;
        if (norm) {
          float S = 0.f, dot = 0.f;
          for (int64_t j = 0; j < k; ++j) S += sn[in[j]];
          S += 1e-20f;
          for (int64_t j = 0; j < k; ++j) dot += dwn[j] * sn[in[j]];
          for (int64_t j = 0; j < k; ++j) g[in[j]] += c * (dwn[j] / S - dot / (S * S));
        } else {
          for (int64_t j = 0; j < k; ++j) g[in[j]] += c * dwn[j];
        }
      }
      float* dln = dlp + n * E;
      if (sigmoid) {
        for (int64_t e = 0; e < E; ++e) dln[e] = g[e] * sn[e] * (1.f - sn[e]);
      } else {
        float dot = 0.f;
        for (int64_t e = 0; e < E; ++e) dot += g[e] * sn[e];
        for (int64_t e = 0; e < E; ++e) dln[e] = sn[e] * (g[e] - dot);
      }
    }
  });
  return dl;
}

// The N k (token, expert) pairs (flat = idx.flatten()) sorted by expert, stable, each expert's slice
// padded to a multiple of `pad` rows. Returns token [rows] (a padding row reads token N - 1), slot
// [N k] (each pair's row), pair [rows] (N k for padding), counts [E], padded counts [E].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_plan(const at::Tensor& idx, int64_t E,
                                                                                int64_t pad) {
  TORCH_CHECK(idx.dim() == 2 && idx.scalar_type() == at::kLong && pad >= 1, "moe_plan: idx must be [N, k] int64");
  const at::Tensor ix = idx.contiguous();
  const int64_t N = ix.size(0), k = ix.size(1), P = N * k;
  const int64_t* fp = ix.data_ptr<int64_t>();
  at::Tensor counts = at::zeros({E}, ix.options()), padded = at::empty({E}, ix.options());
  int64_t* cp = counts.data_ptr<int64_t>();
  int64_t* pp = padded.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(fp[p] >= 0 && fp[p] < E, "moe_plan: expert index ", fp[p], " out of range [0, ", E, ")");
    ++cp[fp[p]];
  }
  std::vector<int64_t> next(E);
  int64_t rows = 0;
  for (int64_t e = 0; e < E; ++e) {
    pp[e] = (cp[e] + pad - 1) / pad * pad;
    next[e] = rows;
    rows += pp[e];
  }
  at::Tensor token = at::full({rows}, std::max<int64_t>(N - 1, 0), ix.options());
  at::Tensor pair = at::full({rows}, P, ix.options());
  at::Tensor slot = at::empty({P}, ix.options());
  int64_t* tp = token.data_ptr<int64_t>();
  int64_t* qp = pair.data_ptr<int64_t>();
  int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t d = next[fp[p]]++;
    sp[p] = d, qp[d] = p, tp[d] = p / k;
  }
  return {token, slot, pair, counts, padded};
}

// ---- the gate's GEMM ----

constexpr int64_t GE = 8;  // experts per pass: their accumulators and x's vector stay in registers

// logits[n, e] = Σ_h x[n, h] w[e, h]: per token, GE experts at a time, x read once per pass
template <typename T>
static void gate_logits_rows(const T* x, const float* w, float* out, int64_t n0, int64_t n1, int64_t H, int64_t E) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* xr = x + n * H;
    for (int64_t e0 = 0; e0 < E; e0 += GE) {
      const int64_t ne = std::min(GE, E - e0);
      vf acc[GE] = {};
      for (int64_t h = 0; h < H; h += W) {
        const vf xv = load_n(xr + h, W);
        for (int64_t e = 0; e < ne; ++e) acc[e] += xv * load<vf>(w + (e0 + e) * H + h);
      }
      for (int64_t e = 0; e < ne; ++e) out[n * E + e0 + e] = hsum(acc[e]);
    }
  }
}

static void check_gate(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.scalar_type() == w.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "gate_logits: x [N, H] and w [E, H] of one dtype, fp32 or bf16");
  TORCH_CHECK(x.size(1) % W == 0, "gate_logits: H must be a multiple of ", W);
}

at::Tensor gate_logits(const at::Tensor& x_, const at::Tensor& w_) {
  check_gate(x_, w_);
  const at::Tensor x = x_.contiguous(), w = w_.to(at::kFloat).contiguous();
  const int64_t N = x.size(0), H = x.size(1), E = w.size(0);
  at::Tensor out = at::empty({N, E}, x.options().dtype(at::kFloat));
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (x.scalar_type() == at::kFloat) gate_logits_rows(x.data_ptr<float>(), wp, op, n0, n1, H, E);
    else gate_logits_rows(reinterpret_cast<const uint16_t*>(x.data_ptr()), wp, op, n0, n1, H, E);
  });
  return out;
}

// dx[n] (+)= Σ_e dl[n, e] w[e] (x's dtype), per token; adding onto dx's values if add
template <typename T>
static void gate_dx_rows(const float* dl, const float* w, T* dx, bool add, int64_t n0, int64_t n1, int64_t H, int64_t E) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t h = 0; h < H; h += W) {
      vf acc = add ? load_n(dx + n * H + h, W) : vf{};
      for (int64_t e = 0; e < E; ++e) acc += dl[n * E + e] * load<vf>(w + e * H + h);
      store_n(dx + n * H + h, acc, W);
    }
}

// dw[e, h0 : h1) = Σ_n dl[n, e] x[n, h0 : h1) in fp32: columns of 2 vectors, GE experts at a time
template <typename T>
static void gate_dw_cols(const float* dl, const T* x, float* dw, int64_t N, int64_t H, int64_t E, int64_t h0, int64_t h1) {
  for (int64_t h = h0; h < h1; h += 2 * W) {
    const int nv = h + 2 * W <= h1 ? 2 : 1;
    for (int64_t e0 = 0; e0 < E; e0 += GE) {
      const int64_t ne = std::min(GE, E - e0);
      vf acc[GE][2] = {};
      for (int64_t n = 0; n < N; ++n) {
        const vf x0 = load_n(x + n * H + h, W), x1 = nv == 2 ? load_n(x + n * H + h + W, W) : vf{};
        const float* d = dl + n * E + e0;
        for (int64_t e = 0; e < ne; ++e) acc[e][0] += d[e] * x0, acc[e][1] += d[e] * x1;
      }
      for (int64_t e = 0; e < ne; ++e)
        for (int v = 0; v < nv; ++v) store_n(dw + (e0 + e) * H + h + v * W, acc[e][v], W);
    }
  }
}

// (dx, dw); dx_into: x's gradient from elsewhere (the experts'), which dx is added onto in place (one
// pass instead of a second tensor and autograd's add)
std::tuple<at::Tensor, at::Tensor> gate_logits_bwd(const at::Tensor& dl_, const at::Tensor& x_, const at::Tensor& w_,
                                                   const c10::optional<at::Tensor>& dx_into) {
  check_gate(x_, w_);
  const at::Tensor x = x_.contiguous(), w = w_.to(at::kFloat).contiguous(), dl = dl_.to(at::kFloat).contiguous();
  const int64_t N = x.size(0), H = x.size(1), E = w.size(0);
  TORCH_CHECK(dl.dim() == 2 && dl.size(0) == N && dl.size(1) == E, "gate_logits_bwd: dl must be [N, E]");
  const bool add = dx_into.has_value() && dx_into->defined();
  TORCH_CHECK(!add || (dx_into->sizes() == x.sizes() && dx_into->scalar_type() == x.scalar_type() &&
                       dx_into->is_contiguous()), "gate_logits_bwd: dx_into must be like x, contiguous");
  at::Tensor dx = add ? *dx_into : at::empty_like(x), dw = at::empty({E, H}, x.options().dtype(at::kFloat));
  const float *dlp = dl.data_ptr<float>(), *wp = w.data_ptr<float>();
  const bool f32 = x.scalar_type() == at::kFloat;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (f32) gate_dx_rows(dlp, wp, dx.data_ptr<float>(), add, n0, n1, H, E);
    else gate_dx_rows(dlp, wp, reinterpret_cast<uint16_t*>(dx.data_ptr()), add, n0, n1, H, E);
  });
  const int64_t blocks = (H + 2 * W - 1) / (2 * W);  // column blocks split between threads: sums in one order
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t h0 = b0 * 2 * W, h1 = std::min(H, b1 * 2 * W);
    if (f32) gate_dw_cols(dlp, x.data_ptr<float>(), dw.data_ptr<float>(), N, H, E, h0, h1);
    else gate_dw_cols(dlp, reinterpret_cast<const uint16_t*>(x.data_ptr()), dw.data_ptr<float>(), N, H, E, h0, h1);
  });
  return {add ? at::Tensor() : dx, dw.to(w_.scalar_type())};  // with dx_into: the sum is there
}

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("swiglu_fwd(Tensor g, Tensor u, Tensor? rw) -> Tensor");
  m.def("swiglu_bwd(Tensor dh, Tensor g, Tensor u, Tensor? rw, bool rw_grad) -> (Tensor, Tensor)");
  m.def("moe_route(Tensor logits, Tensor? bias, int k, int n_group, int topk_group, int method, bool sigmoid, "
        "bool norm, float scaling) -> (Tensor, Tensor, Tensor)");
  m.def("moe_route_bwd(Tensor? dw, Tensor? ds, Tensor scores, Tensor idx, bool sigmoid, bool norm, float scaling) "
        "-> Tensor");
  m.def("moe_plan(Tensor idx, int E, int pad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gate_logits(Tensor x, Tensor w) -> Tensor");
  m.def("gate_logits_bwd(Tensor dl, Tensor x, Tensor w, Tensor(a!)? dx_into=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("moe_route", &moe_route);
  m.impl("moe_route_bwd", &moe_route_bwd);
  m.impl("moe_plan", &moe_plan);
  m.impl("gate_logits", &gate_logits);
  m.impl("gate_logits_bwd", &gate_logits_bwd);
}
