// MLA's queries, keys and values for the training attention kernel, in one pass each way (fp32, CPU):
//   q  [B, T, H, dn + dr] -> qh [B, H, T, dn + dr]   its last dr dims rotated (RoPE)
//   kv [B, S, H, dn + dv], k_pe [B, S, dr] -> kh [B, H, S, dn + dr] (k_nope, then the one rotated rope key
//                                             every head shares), vh [B, H, S, dv]
// where PyTorch's ops split, rotate (strided halves, ~8 ops per tensor), expand, concatenate and transpose,
// and their backward concatenates the split gradients again. The backward rotates the gradients back
// (the transposed rotation) and sums the rope key's over the heads. cos / sin [B, T, dr / 2] (T = S) hold
// the rotation of each position; `interleave`: pairs (x0, x1), (x2, x3) (DeepSeek's layout), else
// (x_i, x_{i + dr / 2}) (llama's). Registered as torch.ops.nanoseek.mla_qkv / mla_qkv_bwd (kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace {

// (x_a, x_b) of pair i: its two positions in a rope vector of dr
inline void pair_at(int64_t i, int64_t half, bool interleave, int64_t& a, int64_t& b) {
  a = interleave ? 2 * i : i, b = interleave ? 2 * i + 1 : i + half;
}

// out = R(theta) x (sign +1) or R(theta)^T x (sign -1), dr values
inline void rotate(const float* x, const float* c, const float* s, int64_t half, bool interleave, float sign,
                   float* out) {
  for (int64_t i = 0; i < half; ++i) {
    int64_t a, b;
    pair_at(i, half, interleave, a, b);
    const float x0 = x[a], x1 = x[b], sn = sign * s[i];
    out[a] = x0 * c[i] - x1 * sn;
    out[b] = x1 * c[i] + x0 * sn;
  }
}

constexpr int64_t MAX_ROPE = 512;  // rope dims a position's scratch row holds (DeepSeek-V3: 64)

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_qkv(const at::Tensor& q_, const at::Tensor& kv_,
                                                       const at::Tensor& kpe_, const at::Tensor& cos_,
                                                       const at::Tensor& sin_, bool interleave) {
  TORCH_CHECK(q_.dim() == 4 && kv_.dim() == 4 && kpe_.dim() == 3 && q_.scalar_type() == at::kFloat &&
              kv_.scalar_type() == at::kFloat && kpe_.scalar_type() == at::kFloat, "mla_qkv: fp32 q, kv, k_pe");
  const at::Tensor q = q_.contiguous(), kv = kv_.contiguous(), kpe = kpe_.contiguous();
  const at::Tensor cs = cos_.to(at::kFloat).contiguous(), sn = sin_.to(at::kFloat).contiguous();
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), S = kv.size(1), dr = kpe.size(2);
  const int64_t dn = q.size(3) - dr, dv = kv.size(3) - dn, half = dr / 2;
  TORCH_CHECK(dr % 2 == 0 && dr <= MAX_ROPE && dn >= 0 && dv > 0 && kv.size(0) == B && kv.size(2) == H &&
              kpe.size(0) == B && kpe.size(1) == S && S == T && cs.numel() == B * T * half &&
              sn.numel() == B * T * half, "mla_qkv: shapes");
  at::Tensor qh = at::empty({B, H, T, dn + dr}, q.options()), kh = at::empty({B, H, S, dn + dr}, q.options());
  at::Tensor vh = at::empty({B, H, S, dv}, q.options());
  const float *qp = q.data_ptr<float>(), *kvp = kv.data_ptr<float>(), *kp = kpe.data_ptr<float>();
  const float *cp = cs.data_ptr<float>(), *sp = sn.data_ptr<float>();
  float *qo = qh.data_ptr<float>(), *ko = kh.data_ptr<float>(), *vo = vh.data_ptr<float>();
  const int64_t D = dn + dr;
  at::parallel_for(0, B * T, 16, [&](int64_t r0, int64_t r1) {
    float kr[MAX_ROPE];
    for (int64_t r = r0; r < r1; ++r) {  // one position: all its heads
      const int64_t b = r / T, t = r % T;
      const float *c = cp + r * half, *s = sp + r * half;
      rotate(kp + r * dr, c, s, half, interleave, 1.f, kr);
      for (int64_t h = 0; h < H; ++h) {
        const float* qi = qp + (r * H + h) * D;
        float* qd = qo + ((b * H + h) * T + t) * D;
        std::copy(qi, qi + dn, qd);
        rotate(qi + dn, c, s, half, interleave, 1.f, qd + dn);
        const float* kvi = kvp + (r * H + h) * (dn + dv);
        float* kd = ko + ((b * H + h) * S + t) * D;
        std::copy(kvi, kvi + dn, kd);
        std::copy(kr, kr + dr, kd + dn);
        std::copy(kvi + dn, kvi + dn + dv, vo + ((b * H + h) * S + t) * dv);
      }
    }
  });
  return {qh, kh, vh};
}

// gradients of q [B, T, H, dn + dr], kv [B, S, H, dn + dv] and k_pe [B, S, dr] from those of qh, kh, vh
std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_qkv_bwd(const at::Tensor& dqh_, const at::Tensor& dkh_,
                                                           const at::Tensor& dvh_, const at::Tensor& cos_,
                                                           const at::Tensor& sin_, bool interleave, int64_t dn) {
  const at::Tensor dqh = dqh_.contiguous(), dkh = dkh_.contiguous(), dvh = dvh_.contiguous();
  const at::Tensor cs = cos_.to(at::kFloat).contiguous(), sn = sin_.to(at::kFloat).contiguous();
  const int64_t B = dqh.size(0), H = dqh.size(1), T = dqh.size(2), D = dqh.size(3), dr = D - dn, dv = dvh.size(3);
  const int64_t S = dkh.size(2), half = dr / 2;
  TORCH_CHECK(dr <= MAX_ROPE && dkh.size(3) == D && S == T, "mla_qkv_bwd: shapes");
  at::Tensor dq = at::empty({B, T, H, D}, dqh.options()), dkv = at::empty({B, S, H, dn + dv}, dqh.options());
  at::Tensor dkpe = at::empty({B, S, dr}, dqh.options());
  const float *gq = dqh.data_ptr<float>(), *gk = dkh.data_ptr<float>(), *gv = dvh.data_ptr<float>();
  const float *cp = cs.data_ptr<float>(), *sp = sn.data_ptr<float>();
  float *oq = dq.data_ptr<float>(), *okv = dkv.data_ptr<float>(), *ok = dkpe.data_ptr<float>();
  at::parallel_for(0, B * T, 16, [&](int64_t r0, int64_t r1) {
    float acc[MAX_ROPE];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      const float *c = cp + r * half, *s = sp + r * half;
      std::fill(acc, acc + dr, 0.f);
      for (int64_t h = 0; h < H; ++h) {
        const float* gqi = gq + ((b * H + h) * T + t) * D;
        float* dqi = oq + (r * H + h) * D;
        std::copy(gqi, gqi + dn, dqi);
        rotate(gqi + dn, c, s, half, interleave, -1.f, dqi + dn);
        const float* gki = gk + ((b * H + h) * S + t) * D;
        float* dkvi = okv + (r * H + h) * (dn + dv);
        std::copy(gki, gki + dn, dkvi);
        const float* gvi = gv + ((b * H + h) * S + t) * dv;
        std::copy(gvi, gvi + dv, dkvi + dn);
        for (int64_t i = 0; i < dr; ++i) acc[i] += gki[dn + i];
      }
      rotate(acc, c, s, half, interleave, -1.f, ok + r * dr);  // the rotation is linear: rotate the sum
    }
  });
  return {dq, dkv, dkpe};
}

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("mla_qkv(Tensor q, Tensor kv, Tensor k_pe, Tensor cos, Tensor sin, bool interleave) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mla_qkv_bwd(Tensor dqh, Tensor dkh, Tensor dvh, Tensor cos, Tensor sin, bool interleave, int dn) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("mla_qkv", &mla_qkv);
  m.impl("mla_qkv_bwd", &mla_qkv_bwd);
}
