// A DeepSeekMoE layer's experts in fp32, forward and backward, with the token gather, the SwiGLU and
// the weighted combine inside the matrix products (nanoseek/model/moe.py: MoE, the training path):
//   moe_experts      y[n] = shared(x[n]) + Σ_j w[n, j] · expert_{e[n, j]}(x[n]), expert(x) = down(silu(gate x) · up x)
//   moe_experts_bwd  the gradients of x (the experts' part), of the routing weights and of every expert weight
// PyTorch's path writes each token's rows for its experts (a gather), their outputs (before the combine)
// and the same two again in the backward, each a pass over [N·k, H] that costs as much as a small GEMM
// on CPU; here the register tiles read a token's row of x (or of dy) where it lies, through the row
// tables of the dispatch plan (ffn.cpp: moe_plan), and add an expert's output rows straight into the
// token's row of y (or dx). The shared expert is one more expert whose rows are all the tokens.
//
// Tiles: R rows x 2 vectors of accumulators, B rows from a packed panel (the forward's transposed
// weights) or read in place (the backward's), A entries broadcast: on this data it runs as fast as
// MKL's sgemm on the gathered copy (130-145 GFLOP/s on one AVX-512 core, 2026-12-07).
// Passes that add into y / dx by token split the columns between threads (two experts may add into
// one token's row); the others split rows or output blocks. The sums run in a fixed order (the shared
// expert, then the routed experts by index), so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <atomic>
#include <tuple>
#include <vector>

namespace {

constexpr int R = 6;                 // tile rows: their row pointers fit the general registers
constexpr int CM = W == 16 ? 4 : 2;  // tile vectors: 6 x 4 accumulators of 32 registers (AVX-512), 6 x 2 of 16

// acc[r][c] += Σ_{k < K} a(r, k) · b(k)[c·W .. c·W + W). Not inlined: the accumulators get the
// registers to themselves, not shared with the constants of the caller's epilogue.
template <int C, typename A, typename B>
__attribute__((noinline)) void tile(int64_t K, const A& a, const B& b, vf (&out)[R][C]) {
  vf acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = out[r][c];
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b(k);
    vf bv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) bv[c] = load<vf>(bk + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf av = vf{} + a(r, k);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] += av * bv[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) out[r][c] = acc[r][c];
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

template <int C>
using cols = std::integral_constant<int, C>;

// f(cols<C>, n) over the columns [n0, n1) in blocks of CM vectors, then what is left in blocks of 2 and
// 1 (widths are whole vectors). A [K][N] operand packed for these blocks is one [K][C·W] panel per block,
// the one at column n starting at n·K: the tile then streams contiguous memory.
template <typename F>
inline void column_blocks(int64_t n0, int64_t n1, const F& f) {
  for (int64_t n = n0; n < n1;) {
    if (n + CM * W <= n1) {
      f(cols<CM>{}, n);
      n += CM * W;
    } else if (CM > 2 && n + 2 * W <= n1) {
      f(cols<2>{}, n);
      n += 2 * W;
    } else {
      f(cols<1>{}, n);
      n += W;
    }
  }
}

// tasks 0 .. n-1 handed out one at a time to the threads (experts get uneven rows)
template <typename F>
void run_tasks(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, T, 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1)) < n;) f(t);
  });
}

struct Expert {
  int64_t rows = 0, I = 0;      // the rows it computes, its intermediate size
  const int64_t* token = nullptr;  // the rows' tokens; none: row n is token n (the shared expert)
  const int64_t* pair = nullptr;   // the rows' routing weights, as indices into weights [N, k]; none: 1
  const float *wg = nullptr, *wu = nullptr, *wd = nullptr;  // gate, up [I, H]; down [H, I]
  float *gu = nullptr, *h = nullptr;  // [rows, 2I] = gate x | up x;  [rows, I] = silu(g) · u · weight
  float *p1 = nullptr, *p2 = nullptr;  // forward: [H][2I] (gate and up in alternate W-column blocks), [I][H]
  float* dgu = nullptr;               // backward: [rows, 2I]
  float *dwg = nullptr, *dwu = nullptr, *dwd = nullptr;

  int64_t tok(int64_t r) const { return token ? token[r] : r; }
  float weight(int64_t r, const float* w, int64_t nk) const {
    if (!pair) return 1.f;
    return pair[r] < nk ? w[pair[r]] : 0.f;  // a padding row (pair = N·k) adds nothing
  }
};

struct Layer {
  int64_t N = 0, H = 0, nk = 0;
  const float* x = nullptr;
  const float* w = nullptr;  // routing weights [N, k]
  std::vector<Expert> experts;  // the shared expert first, if any
};

// The layer's experts over the tensors (gu / h / packed buffers are filled in by the caller).
Layer describe(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& token, const at::Tensor& pair,
               const at::Tensor& counts, const at::Tensor& w1, const at::Tensor& w2,
               const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& su,
               const c10::optional<at::Tensor>& sd) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "moe_experts: x must be [N, H] fp32");
  const int64_t N = x.size(0), H = x.size(1);
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == N && weights.scalar_type() == at::kFloat &&
              weights.is_contiguous(), "moe_experts: weights must be [N, k] fp32");
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3 && w1.scalar_type() == at::kFloat && w2.scalar_type() == at::kFloat &&
              w1.is_contiguous() && w2.is_contiguous(), "moe_experts: expert weights must be contiguous fp32");
  const int64_t E = w1.size(0), I = w1.size(1) / 2;
  TORCH_CHECK(w1.size(1) == 2 * I && w1.size(2) == H && w2.size(0) == E && w2.size(1) == H && w2.size(2) == I,
              "moe_experts: gate_up_proj must be [E, 2I, H] and down_proj [E, H, I]");
  TORCH_CHECK(H % W == 0 && I % W == 0, "moe_experts: hidden and intermediate sizes must be multiples of ", W);
  TORCH_CHECK(counts.numel() == E && counts.scalar_type() == at::kLong, "moe_experts: counts must be [E] int64");
  TORCH_CHECK(token.scalar_type() == at::kLong && pair.scalar_type() == at::kLong && token.is_contiguous() &&
              pair.is_contiguous() && token.numel() == pair.numel(), "moe_experts: token, pair must be int64 rows");
  const int64_t rows = token.numel(), nk = weights.numel();
  const int64_t* tp = token.data_ptr<int64_t>();
  const int64_t* pp = pair.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)  // the row tables address memory: check them once
    TORCH_CHECK(tp[r] >= 0 && tp[r] < N && pp[r] >= 0 && pp[r] <= nk, "moe_experts: a row's token or pair is out of range");
  Layer L;
  L.N = N, L.H = H, L.nk = nk, L.x = x.data_ptr<float>(), L.w = weights.data_ptr<float>();
  const bool shared = sg.has_value() && sg->defined();
  if (shared) {
    TORCH_CHECK(su.has_value() && sd.has_value(), "moe_experts: the shared expert needs gate, up and down");
    const int64_t Is = sg->size(0);
    TORCH_CHECK(sg->dim() == 2 && sg->sizes() == su->sizes() && sg->size(1) == H && sd->dim() == 2 &&
                sd->size(0) == H && sd->size(1) == Is && Is % W == 0, "moe_experts: shared expert shapes");
    for (const at::Tensor* t : {&*sg, &*su, &*sd})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "moe_experts: shared weights must be contiguous fp32");
    Expert s;
    s.rows = N, s.I = Is, s.wg = sg->data_ptr<float>(), s.wu = su->data_ptr<float>(), s.wd = sd->data_ptr<float>();
    L.experts.push_back(s);
  }
  const int64_t* cp = counts.data_ptr<int64_t>();
  int64_t row0 = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(cp[e] >= 0 && row0 + cp[e] <= rows, "moe_experts: counts do not match the rows");
    Expert ex;
    ex.rows = cp[e], ex.I = I, ex.token = tp + row0, ex.pair = pp + row0;
    ex.wg = w1.data_ptr<float>() + e * 2 * I * H, ex.wu = ex.wg + I * H, ex.wd = w2.data_ptr<float>() + e * H * I;
    L.experts.push_back(ex);
    row0 += cp[e];
  }
  TORCH_CHECK(row0 == rows, "moe_experts: counts do not match the rows");
  return L;
}

// Each expert's saved rows ([rows, 2I] and [rows, I]) as views into one buffer per kind: the shared
// expert's (all tokens) in its own tensors, the routed experts' in rows sorted by expert.
void point_rows(Layer& L, at::Tensor& gu, at::Tensor& h, at::Tensor& sgu, at::Tensor& sh) {
  size_t e = 0;
  if (sgu.defined() && sgu.numel()) {
    L.experts[0].gu = sgu.data_ptr<float>(), L.experts[0].h = sh.data_ptr<float>();
    e = 1;
  }
  int64_t row0 = 0;
  for (; e < L.experts.size(); ++e) {
    Expert& ex = L.experts[e];
    ex.gu = gu.data_ptr<float>() + row0 * 2 * ex.I, ex.h = h.data_ptr<float>() + row0 * ex.I;
    row0 += ex.rows;
  }
}

// f(expert, first row, end row) over every expert's rows in slices of 8 tiles, handed out to the threads
template <typename F>
void run_row_tasks(const Layer& L, const F& f) {
  std::vector<std::tuple<size_t, int64_t, int64_t>> tasks;
  for (size_t e = 0; e < L.experts.size(); ++e)
    for (int64_t m = 0; m < L.experts[e].rows; m += 8 * R)
      tasks.emplace_back(e, m, std::min(m + 8 * R, L.experts[e].rows));
  run_tasks(tasks.size(), [&](int64_t t) {
    const auto [e, m0, m1] = tasks[t];
    f(L.experts[e], m0, m1);
  });
}

// ---- forward ----

// I in blocks of the gate-up tile: CM / 2 vectors of gate columns beside the same up columns, the
// rest 1 + 1
template <typename F>
inline void gate_up_blocks(int64_t I, const F& f) {
  for (int64_t j = 0; j < I;) {
    if (j + CM / 2 * W <= I) {
      f(cols<CM>{}, j);
      j += CM / 2 * W;
    } else {
      f(cols<2>{}, j);
      j += W;
    }
  }
}

// The forward's weights transposed into panels (column_blocks): p1 = [gate; up]^T [H][2I], each panel a
// block of gate columns then the same up columns (the SwiGLU's two inputs land in one tile), p2 = down^T [I][H]
void pack(Expert& ex, int64_t H) {
  const int64_t I = ex.I;
  constexpr int64_t KB = 16;  // k rows at a time: the panel rows being written stay in L1
  gate_up_blocks(I, [&](auto Cc, int64_t j) {
    constexpr int64_t bw = decltype(Cc)::value / 2 * W;
    float* p = ex.p1 + j * 2 * H;
    for (int64_t k0 = 0; k0 < H; k0 += KB)
      for (int64_t c = 0; c < bw; ++c) {
        const float* g = ex.wg + (j + c) * H;
        const float* u = ex.wu + (j + c) * H;
        for (int64_t k = k0; k < std::min(H, k0 + KB); ++k) p[k * 2 * bw + c] = g[k], p[k * 2 * bw + bw + c] = u[k];
      }
  });
  column_blocks(0, H, [&](auto Cc, int64_t n0) {
    constexpr int64_t bw = decltype(Cc)::value * W;
    float* p = ex.p2 + n0 * I;
    for (int64_t i0 = 0; i0 < I; i0 += KB)
      for (int64_t c = 0; c < bw; ++c) {
        const float* d = ex.wd + (n0 + c) * I;
        for (int64_t i = i0; i < std::min(I, i0 + KB); ++i) p[i * bw + c] = d[i];
      }
  });
}

// rows [m0, m1) of an expert: gu = x[token] @ [gate; up]^T, h = silu(g) · u · weight
void gate_up_rows(const Layer& L, const Expert& ex, int64_t m0, int64_t m1) {
  const int64_t H = L.H, I = ex.I;
  for (int64_t m = m0; m < m1; m += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, m1 - m));
    const float* xr[R];
    float w[R];
    for (int r = 0; r < R; ++r) {
      const int64_t i = m + std::min(r, nr - 1);
      xr[r] = L.x + ex.tok(i) * H;
      w[r] = ex.weight(i, L.w, L.nk);
    }
    gate_up_blocks(I, [&](auto Cc, int64_t j) {
      constexpr int C = decltype(Cc)::value, V = C / 2;  // V gate vectors, then V up vectors
      const float* p = ex.p1 + j * 2 * H;
      vf acc[R][C] = {};
      tile(H, [&](int r, int64_t k) { return xr[r][k]; }, [&](int64_t k) { return p + k * C * W; }, acc);
      for (int r = 0; r < nr; ++r) {
        float* gu = ex.gu + (m + r) * 2 * I + j;
        float* h = ex.h + (m + r) * I + j;
        for (int v = 0; v < V; ++v) {
          const vf g = acc[r][v], u = acc[r][V + v];
          store(gu + v * W, g);
          store(gu + I + v * W, u);
          store(h + v * W, g * sigmoid_v(g) * u * w[r]);
        }
      }
    });
  }
}

// out[token, c0 : c1) (+)= Σ over the expert's rows of (a_row @ B)[c0 : c1) (tile_at(acc, rows, n0) adds
// one block's products), the first expert storing; a tile of rows is read once for all the columns
template <typename ARow, typename Tile>
void scatter_rows(const Expert& ex, float* out, int64_t H, int64_t c0, int64_t c1, bool first, const ARow& arow,
                  const Tile& tile_at) {
  for (int64_t m = 0; m < ex.rows; m += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, ex.rows - m));
    const float* ar[R];
    for (int r = 0; r < R; ++r) ar[r] = arow(m + std::min(r, nr - 1));
    column_blocks(c0, c1, [&](auto Cc, int64_t n0) {
      constexpr int C = decltype(Cc)::value;
      vf acc[R][C] = {};
      tile_at(acc, ar, n0);
      for (int r = 0; r < nr; ++r) {
        float* dst = out + ex.tok(m + r) * H + n0;
        for (int c = 0; c < C; ++c) store(dst + c * W, first ? acc[r][c] : load<vf>(dst + c * W) + acc[r][c]);
      }
    });
  }
}

// Column ranges of [0, H) for the passes that add by token, one per thread, in whole CM-vector blocks
// (so each range's blocks are the panels' blocks)
template <typename F>
void column_tasks(int64_t H, const F& f) {
  const int64_t bw = CM * W, blocks = (H + bw - 1) / bw;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  run_tasks(T, [&](int64_t t) { f(blocks * t / T * bw, std::min(H, blocks * (t + 1) / T * bw)); });
}

// y[:, c0 : c1) = Σ over experts and their rows of h_row @ down^T, by token
void down_cols(const Layer& L, float* y, int64_t c0, int64_t c1, bool zeroed) {
  const int64_t H = L.H;
  for (size_t e = 0; e < L.experts.size(); ++e) {
    const Expert& ex = L.experts[e];
    if (!ex.rows) continue;
    const int64_t I = ex.I;
    scatter_rows(ex, y, H, c0, c1, e == 0 && !zeroed, [&](int64_t i) { return ex.h + i * I; },
                 [&](auto& acc, const float* const (&ar)[R], int64_t n0) {
                   constexpr int C = std::extent_v<std::remove_reference_t<decltype(acc[0])>>;
                   const float* p = ex.p2 + n0 * I;
                   tile(I, [&](int r, int64_t k) { return ar[r][k]; }, [&](int64_t k) { return p + k * C * W; }, acc);
                 });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& token, const at::Tensor& pair,
    const at::Tensor& counts, const at::Tensor& w1, const at::Tensor& w2, const c10::optional<at::Tensor>& sg,
    const c10::optional<at::Tensor>& su, const c10::optional<at::Tensor>& sd) {
  Layer L = describe(x, weights, token, pair, counts, w1, w2, sg, su, sd);
  const int64_t N = L.N, H = L.H, I = w1.size(1) / 2;
  const bool shared = sg.has_value() && sg->defined();
  const int64_t Is = shared ? sg->size(0) : 0;
  at::Tensor gu = at::empty({token.numel(), 2 * I}, x.options()), h = at::empty({token.numel(), I}, x.options());
  at::Tensor sgu = at::empty({shared ? N : 0, 2 * Is}, x.options()), sh = at::empty({shared ? N : 0, Is}, x.options());
  point_rows(L, gu, h, sgu, sh);
  int64_t packed = 0;
  for (const Expert& ex : L.experts) packed += 3 * ex.I * H;
  at::Tensor buf = at::empty({packed}, x.options());
  float* p = buf.data_ptr<float>();
  for (Expert& ex : L.experts) {
    ex.p1 = p, ex.p2 = p + 2 * ex.I * H;
    p += 3 * ex.I * H;
  }
  run_tasks(L.experts.size(), [&](int64_t e) { pack(L.experts[e], H); });
  run_row_tasks(L, [&](const Expert& ex, int64_t m0, int64_t m1) { gate_up_rows(L, ex, m0, m1); });
  const bool zeroed = !shared;  // the shared expert's rows are every token: it stores, the others add
  at::Tensor y = zeroed ? at::zeros({N, H}, x.options()) : at::empty({N, H}, x.options());
  float* yp = y.data_ptr<float>();
  column_tasks(H, [&](int64_t c0, int64_t c1) { down_cols(L, yp, c0, c1, zeroed); });
  return {y, gu, h, sgu, sh};
}

// ---- backward ----

// rows [m0, m1) of an expert: dh = dy[token] @ down (not kept), through the SwiGLU to dgu, and the
// routing weight's gradient Σ_i dh · silu(g) · u into dw[pair]
void down_bwd_rows(const Layer& L, const Expert& ex, const float* dy, float* dw, int64_t m0, int64_t m1) {
  const int64_t H = L.H, I = ex.I;
  for (int64_t m = m0; m < m1; m += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, m1 - m));
    const float* dr[R];
    float w[R];
    vf dsum[R] = {};
    for (int r = 0; r < R; ++r) {
      const int64_t i = m + std::min(r, nr - 1);
      dr[r] = dy + ex.tok(i) * H;
      w[r] = ex.weight(i, L.w, L.nk);
    }
    column_blocks(0, I, [&](auto Cc, int64_t j) {
      constexpr int C = decltype(Cc)::value;
      vf acc[R][C] = {};
      tile(H, [&](int r, int64_t k) { return dr[r][k]; }, [&](int64_t k) { return ex.wd + k * I + j; }, acc);
      for (int r = 0; r < nr; ++r) {
        const float* gu = ex.gu + (m + r) * 2 * I;
        float* dgu = ex.dgu + (m + r) * 2 * I;
        for (int c = 0; c < C; ++c) {
          const int64_t i = j + c * W;
          const vf g = load<vf>(gu + i), u = load<vf>(gu + I + i), dh = acc[r][c];
          const vf s = sigmoid_v(g), silu = g * s;
          dsum[r] += dh * silu * u;
          store(dgu + i, dh * w[r] * u * s * (1.f + g * (1.f - s)));
          store(dgu + I + i, dh * w[r] * silu);
        }
      }
    });
    if (ex.pair)
      for (int r = 0; r < nr; ++r)
        if (ex.pair[m + r] < L.nk) dw[ex.pair[m + r]] = hsum(dsum[r]);
  }
}

constexpr int64_t KC = 256;  // rows of an expert per pass of a weight gradient: their [KC, N] operand stays in L2

// dst = Σ_k a_k^T b_k over the expert's rows k for an [M, N] weight gradient: arow(k) the k-th row's M
// entries (dy through the token table, or dgu), brow(k) its N entries (x through the token table, or
// h), drow(j) output row j. Blocks of KC rows outermost, so a block's rows are read from L2 for every
// output row block, not from memory.
template <typename A, typename B, typename D>
void weight_grad(int64_t rows, int64_t M, int64_t N, const A& arow, const B& brow, const D& drow) {
  for (int64_t kb = 0; kb < std::max<int64_t>(rows, 1); kb += KC) {
    const int64_t kn = std::min(KC, rows - kb);
    for (int64_t j0 = 0; j0 < M; j0 += R) {
      const int nr = static_cast<int>(std::min<int64_t>(R, M - j0));
      int64_t off[R];  // the last block's rows past M repeat its last row (computed, not stored)
      float* dst[R];
      for (int r = 0; r < R; ++r) off[r] = j0 + std::min(r, nr - 1), dst[r] = drow(off[r]);
      column_blocks(0, N, [&](auto Cc, int64_t n) {
        constexpr int C = decltype(Cc)::value;
        vf acc[R][C] = {};
        if (kb)
          for (int r = 0; r < nr; ++r)
            for (int c = 0; c < C; ++c) acc[r][c] = load<vf>(dst[r] + n + c * W);
        const auto b = [&](int64_t k) { return brow(kb + k) + n; };
        if (nr == R) tile(kn, [&](int r, int64_t k) { return arow(kb + k)[j0 + r]; }, b, acc);
        else tile(kn, [&](int r, int64_t k) { return arow(kb + k)[off[r]]; }, b, acc);
        for (int r = 0; r < nr; ++r)
          for (int c = 0; c < C; ++c) store(dst[r] + n + c * W, acc[r][c]);
      });
    }
  }
}

// the down weight's gradient [H, I]: Σ over the expert's rows of dy[token]^T h_row
void down_grad(const Layer& L, const Expert& ex, const float* dy) {
  const int64_t H = L.H, I = ex.I;
  weight_grad(ex.rows, H, I, [&](int64_t k) { return dy + ex.tok(k) * H; }, [&](int64_t k) { return ex.h + k * I; },
              [&](int64_t j) { return ex.dwd + j * I; });
}

// [gate; up]'s gradient [2I, H]: Σ over the expert's rows of dgu_row^T x[token]
void gate_up_grad(const Layer& L, const Expert& ex) {
  const int64_t H = L.H, I = ex.I;
  weight_grad(ex.rows, 2 * I, H, [&](int64_t k) { return ex.dgu + k * 2 * I; },
              [&](int64_t k) { return L.x + ex.tok(k) * H; },
              [&](int64_t j) { return j < I ? ex.dwg + j * H : ex.dwu + (j - I) * H; });
}

// dx[:, c0 : c1) = Σ over experts and their rows of dgu_row @ [gate; up], by token
void gate_up_bwd_cols(const Layer& L, float* dx, int64_t c0, int64_t c1, bool zeroed) {
  const int64_t H = L.H;
  for (size_t e = 0; e < L.experts.size(); ++e) {
    const Expert& ex = L.experts[e];
    if (!ex.rows) continue;
    const int64_t I = ex.I;
    scatter_rows(ex, dx, H, c0, c1, e == 0 && !zeroed, [&](int64_t i) { return ex.dgu + i * 2 * I; },
                 [&](auto& acc, const float* const (&ar)[R], int64_t n0) {
                   tile(I, [&](int r, int64_t k) { return ar[r][k]; }, [&](int64_t k) { return ex.wg + k * H + n0; }, acc);
                   tile(I, [&](int r, int64_t k) { return ar[r][I + k]; }, [&](int64_t k) { return ex.wu + k * H + n0; },
                        acc);
                 });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& token,
    const at::Tensor& pair, const at::Tensor& counts, const at::Tensor& w1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& su, const c10::optional<at::Tensor>& sd,
    const at::Tensor& gu, const at::Tensor& h, const at::Tensor& sgu, const at::Tensor& sh) {
  Layer L = describe(x, weights, token, pair, counts, w1, w2, sg, su, sd);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == at::kFloat && dy.is_contiguous(),
              "moe_experts_bwd: dy must be like x");
  const int64_t N = L.N, H = L.H, I = w1.size(1) / 2;
  const bool shared = sg.has_value() && sg->defined();
  const int64_t Is = shared ? sg->size(0) : 0;
  TORCH_CHECK(gu.sizes() == at::IntArrayRef({token.numel(), 2 * I}) && h.sizes() == at::IntArrayRef({token.numel(), I}) &&
              sgu.sizes() == at::IntArrayRef({shared ? N : 0, 2 * Is}) && sh.sizes() == at::IntArrayRef({shared ? N : 0, Is}),
              "moe_experts_bwd: saved rows do not match the layer");
  at::Tensor gu_ = gu.contiguous(), h_ = h.contiguous(), sgu_ = sgu.contiguous(), sh_ = sh.contiguous();
  point_rows(L, gu_, h_, sgu_, sh_);
  at::Tensor dgu = at::empty_like(gu_), sdgu = at::empty_like(sgu_);
  at::Tensor dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  at::Tensor dsg = shared ? at::empty_like(*sg) : at::Tensor(), dsu = shared ? at::empty_like(*su) : at::Tensor();
  at::Tensor dsd = shared ? at::empty_like(*sd) : at::Tensor();
  at::Tensor dweights = at::zeros_like(weights);
  {
    size_t e = 0;
    if (shared) {
      Expert& s = L.experts[0];
      s.dgu = sdgu.data_ptr<float>(), s.dwg = dsg.data_ptr<float>(), s.dwu = dsu.data_ptr<float>(), s.dwd = dsd.data_ptr<float>();
      e = 1;
    }
    int64_t row0 = 0;
    for (int64_t r = 0; e < L.experts.size(); ++e, ++r) {
      Expert& ex = L.experts[e];
      ex.dgu = dgu.data_ptr<float>() + row0 * 2 * I;
      ex.dwg = dw1.data_ptr<float>() + r * 2 * I * H, ex.dwu = ex.dwg + I * H, ex.dwd = dw2.data_ptr<float>() + r * H * I;
      row0 += ex.rows;
    }
  }
  const float* dyp = dy.data_ptr<float>();
  float* dwp = dweights.data_ptr<float>();
  run_row_tasks(L, [&](const Expert& ex, int64_t m0, int64_t m1) { down_bwd_rows(L, ex, dyp, dwp, m0, m1); });
  run_tasks(2 * L.experts.size(), [&](int64_t t) {  // one task per weight gradient
    if (t % 2) down_grad(L, L.experts[t / 2], dyp);
    else gate_up_grad(L, L.experts[t / 2]);
  });
  const bool zeroed = !shared;
  at::Tensor dx = zeroed ? at::zeros({N, H}, x.options()) : at::empty({N, H}, x.options());
  float* dxp = dx.data_ptr<float>();
  column_tasks(H, [&](int64_t c0, int64_t c1) { gate_up_bwd_cols(L, dxp, c0, c1, zeroed); });
  return {dx, dweights, dw1, dw2, dsg, dsu, dsd};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("moe_experts(Tensor x, Tensor weights, Tensor token, Tensor pair, Tensor counts, Tensor w1, Tensor w2, "
        "Tensor? sg, Tensor? su, Tensor? sd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_experts_bwd(Tensor dy, Tensor x, Tensor weights, Tensor token, Tensor pair, Tensor counts, Tensor w1, "
        "Tensor w2, Tensor? sg, Tensor? su, Tensor? sd, Tensor gu, Tensor h, Tensor sgu, Tensor sh) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("moe_experts", &moe_experts);
  m.impl("moe_experts_bwd", &moe_experts_bwd);
}
