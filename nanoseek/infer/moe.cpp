// A DeepSeekMoE layer's experts in fp32 or bf16, forward and backward, with the token gather, the SwiGLU
// and the weighted combine inside the matrix products (nanoseek/model/moe.py: MoE, the training path):
//   moe_experts      y[n] = shared(x[n]) + Σ_j w[n, j] · expert_{e[n, j]}(x[n]), expert(x) = down(silu(gate x) · up x)
//   moe_experts_bwd  the gradients of x (the experts' part), of the routing weights and of every expert weight
// PyTorch's path writes each token's rows for its experts (a gather), their outputs (before the combine)
// and the same two again in the backward, each a pass over [N·k, H] that costs as much as a small GEMM
// on CPU; here the register tiles read a token's row of x (or of dy) where it lies, through the row
// tables of the dispatch plan (ffn.cpp: moe_plan), and add an expert's output rows straight into the
// token's row of y (or dx). The shared expert is one more expert whose rows are all the tokens.
//
// Tiles: R rows x C vectors of fp32 accumulators, B rows from a packed panel, A entries broadcast. fp32
// multiplies with FMAs; bf16 (where the CPU has AVX512_BF16) with vdpbf16ps, which takes two k at a
// time: a bf16 B operand is packed as pairs of its k rows interleaved ([K/2][N][2]), so an A row's
// two neighbouring entries are one 32-bit broadcast. Sums are fp32 in both; a bf16 layer's outputs
// and weight gradients are rounded to bf16 once, at the end, and its saved SwiGLU inputs (and
// sigmoid(gate), kept for the backward) are bf16.
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

using bf16 = uint16_t;  // a bf16's bits (at::BFloat16's storage)
#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr bool NATIVE_BF16 = true;
#else
constexpr bool NATIVE_BF16 = false;
#endif

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

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// The same in bf16 over pairs of k: acc[r][c] += Σ_{p < P} a(r, p) · b(p)[c·2W .. c·2W + 2W), a(r, p) the
// 32 bits of A's entries (r, 2p) and (r, 2p + 1), b(p) the pair row p of a [K/2][N][2] operand.
template <int C, typename A, typename B>
__attribute__((noinline)) void tile_bf16(int64_t P, const A& a, const B& b, vf (&out)[R][C]) {
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = out[r][c];
  for (int64_t p = 0; p < P; ++p) {
    const bf16* bp = b(p);
    __m512i bv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) bv[c] = _mm512_loadu_si512(bp + c * 2 * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(a(r, p));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)av, (__m512bh)bv[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) out[r][c] = acc[r][c];
}
#endif

inline int32_t pair_at(const bf16* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// acc[r][c] += Σ_{k < K} ar[r][k] · B(k, c·W ..) for R rows of A read in place and a B operand in T's
// layout at its first column: fp32 row k at b + k·ldb; bf16 pair row k/2 at b + k·ldb (2·ldb entries:
// the caller's b for column n is base + 2n). K even in bf16.
template <int C>
void mm_tile(int64_t K, const float* const (&ar)[R], const float* b, int64_t ldb, vf (&acc)[R][C]) {
  tile(K, [&](int r, int64_t k) { return ar[r][k]; }, [&](int64_t k) { return b + k * ldb; }, acc);
}

template <int C>
void mm_tile(int64_t K, const bf16* const (&ar)[R], const bf16* b, int64_t ldb, vf (&acc)[R][C]) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  tile_bf16(K / 2, [&](int r, int64_t p) { return pair_at(ar[r] + 2 * p); },
            [&](int64_t p) { return b + 2 * p * ldb; }, acc);
#else
  TORCH_CHECK(false, "moe_experts: bf16 needs a CPU with AVX512_BF16");
#endif
}

// column n of an operand in T's layout (bf16: pairs, two entries per column)
template <typename T>
constexpr int64_t col(int64_t n) { return std::is_same_v<T, float> ? n : 2 * n; }

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
inline void store(bf16* p, vf v) { store_bf16(p, v); }

// out[2i] = a[i], out[2i + 1] = b[i] (b null: zeros) for i < n, n a multiple of W: two k rows of a bf16
// operand as one pair row
void interleave(const bf16* a, const bf16* b, int64_t n, bf16* out) {
  int64_t i = 0;
#if defined(__AVX512BW__)
  // 32 at a time: unpack within 128-bit lanes, then put the lanes back in order (two 64-bit permutes)
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (; i + 32 <= n; i += 32) {
    const __m512i va = _mm512_loadu_si512(a + i), vb = b ? _mm512_loadu_si512(b + i) : _mm512_setzero_si512();
    const __m512i lo = _mm512_unpacklo_epi16(va, vb), hi = _mm512_unpackhi_epi16(va, vb);
    _mm512_storeu_si512(out + 2 * i, _mm512_permutex2var_epi64(lo, first, hi));
    _mm512_storeu_si512(out + 2 * i + 32, _mm512_permutex2var_epi64(lo, second, hi));
  }
#endif
  for (; i < n; i += W) {
    vu32 lo = __builtin_convertvector(load<vu16>(a + i), vu32);
    vu32 hi = b ? __builtin_convertvector(load<vu16>(b + i), vu32) : vu32{};
    const vu32 v = lo | (hi << 16);
    std::memcpy(out + 2 * i, &v, sizeof(v));
  }
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

template <typename T>
struct Expert {
  int64_t rows = 0, I = 0;      // the rows it computes, its intermediate size
  const int64_t* token = nullptr;  // the rows' tokens; none: row n is token n (the shared expert)
  const int64_t* pair = nullptr;   // the rows' routing weights, as indices into weights [N, k]; none: 1
  const T *wg = nullptr, *wu = nullptr, *wd = nullptr;  // gate, up [I, H]; down [H, I]
  T *gu = nullptr, *h = nullptr;  // [rows, 2I] = gate x | up x;  [rows, 2I] = silu(g) · u · weight | sigmoid(g)
  T *p1 = nullptr, *p2 = nullptr;  // forward: [H][2I] (gate and up in alternate W-column blocks), [I][H]
  const T *bd = nullptr, *bg = nullptr, *bu = nullptr;  // backward's B operands: down [H][I], gate, up [I][H]
  T* dgu = nullptr;               // backward: [rows, 2I]
  float *dwg = nullptr, *dwu = nullptr, *dwd = nullptr;  // weight gradients' sums over blocks of rows (fp32)
  T *owg = nullptr, *owu = nullptr, *owd = nullptr;       // ... and their final values (fp32: the same memory)

  int64_t tok(int64_t r) const { return token ? token[r] : r; }
  float weight(int64_t r, const float* w, int64_t nk) const {
    if (!pair) return 1.f;
    return pair[r] < nk ? w[pair[r]] : 0.f;  // a padding row (pair = N·k) adds nothing
  }
};

template <typename T>
struct Layer {
  int64_t N = 0, H = 0, nk = 0;
  const T* x = nullptr;
  const float* w = nullptr;  // routing weights [N, k]
  std::vector<Expert<T>> experts;  // the shared expert first, if any
};

template <typename T>
T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

template <typename T>
constexpr at::ScalarType scalar_type() { return std::is_same_v<T, float> ? at::kFloat : at::kBFloat16; }

// The layer's experts over the tensors (gu / h / packed buffers are filled in by the caller).
template <typename T>
Layer<T> describe(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& token, const at::Tensor& pair,
                  const at::Tensor& counts, const at::Tensor& w1, const at::Tensor& w2,
                  const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& su,
                  const c10::optional<at::Tensor>& sd) {
  constexpr auto st = scalar_type<T>();
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "moe_experts: x must be [N, H], contiguous");
  const int64_t N = x.size(0), H = x.size(1);
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == N && weights.scalar_type() == at::kFloat &&
              weights.is_contiguous(), "moe_experts: weights must be [N, k] fp32");
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3 && w1.scalar_type() == st && w2.scalar_type() == st &&
              w1.is_contiguous() && w2.is_contiguous(), "moe_experts: expert weights must be contiguous, of x's dtype");
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
  Layer<T> L;
  L.N = N, L.H = H, L.nk = nk, L.x = ptr<const T>(x), L.w = weights.data_ptr<float>();
  const bool shared = sg.has_value() && sg->defined();
  if (shared) {
    TORCH_CHECK(su.has_value() && sd.has_value(), "moe_experts: the shared expert needs gate, up and down");
    const int64_t Is = sg->size(0);
    TORCH_CHECK(sg->dim() == 2 && sg->sizes() == su->sizes() && sg->size(1) == H && sd->dim() == 2 &&
                sd->size(0) == H && sd->size(1) == Is && Is % W == 0, "moe_experts: shared expert shapes");
    for (const at::Tensor* t : {&*sg, &*su, &*sd})
      TORCH_CHECK(t->scalar_type() == st && t->is_contiguous(), "moe_experts: shared weights must be contiguous, of x's dtype");
    Expert<T> s;
    s.rows = N, s.I = Is, s.wg = ptr<const T>(*sg), s.wu = ptr<const T>(*su), s.wd = ptr<const T>(*sd);
    L.experts.push_back(s);
  }
  const int64_t* cp = counts.data_ptr<int64_t>();
  int64_t row0 = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(cp[e] >= 0 && row0 + cp[e] <= rows, "moe_experts: counts do not match the rows");
    Expert<T> ex;
    ex.rows = cp[e], ex.I = I, ex.token = tp + row0, ex.pair = pp + row0;
    ex.wg = ptr<const T>(w1) + e * 2 * I * H, ex.wu = ex.wg + I * H, ex.wd = ptr<const T>(w2) + e * H * I;
    L.experts.push_back(ex);
    row0 += cp[e];
  }
  TORCH_CHECK(row0 == rows, "moe_experts: counts do not match the rows");
  return L;
}

// Each expert's saved rows ([rows, 2I] each) as views into one buffer per kind: the shared
// expert's (all tokens) in its own tensors, the routed experts' in rows sorted by expert.
template <typename T>
void point_rows(Layer<T>& L, at::Tensor& gu, at::Tensor& h, at::Tensor& sgu, at::Tensor& sh) {
  size_t e = 0;
  if (sgu.defined() && sgu.numel()) {
    L.experts[0].gu = ptr<T>(sgu), L.experts[0].h = ptr<T>(sh);
    e = 1;
  }
  int64_t row0 = 0;
  for (; e < L.experts.size(); ++e) {
    Expert<T>& ex = L.experts[e];
    ex.gu = ptr<T>(gu) + row0 * 2 * ex.I, ex.h = ptr<T>(h) + row0 * 2 * ex.I;
    row0 += ex.rows;
  }
}

constexpr int TS = 8;  // row tiles per slice: a task's rows

// f(expert, first row, end row) over every expert's rows in slices of TS tiles, handed out to the threads
template <typename T, typename F>
void run_row_tasks(const Layer<T>& L, const F& f) {
  std::vector<std::tuple<size_t, int64_t, int64_t>> tasks;
  for (size_t e = 0; e < L.experts.size(); ++e)
    for (int64_t m = 0; m < L.experts[e].rows; m += TS * R)
      tasks.emplace_back(e, m, std::min(m + TS * R, L.experts[e].rows));
  run_tasks(tasks.size(), [&](int64_t t) {
    const auto [e, m0, m1] = tasks[t];
    f(L.experts[e], m0, m1);
  });
}

// k per pass over a slice: the B operand's [KB][C·W] block (16 KB) stays in L1 while the slice's row
// tiles pass over it (a whole K of 512 is a 64-128 KB panel, read from L2 by every tile)
template <typename T>
constexpr int64_t KB = std::is_same_v<T, float> ? 64 : 128;

// acc[t] += the products of row tile t's rows ar[t] (K entries each) with B (mm_tile's layout), t < nt
template <typename T, int C>
void slice_tiles(int64_t K, int nt, const T* const (&ar)[TS][R], const T* b, int64_t ldb, vf (&acc)[TS][R][C]) {
  for (int64_t k0 = 0; k0 < K; k0 += KB<T>) {
    const int64_t kn = std::min(KB<T>, K - k0);
    for (int t = 0; t < nt; ++t) {
      const T* a[R];
      for (int r = 0; r < R; ++r) a[r] = ar[t][r] + k0;
      mm_tile(kn, a, b + k0 * ldb, ldb, acc[t]);
    }
  }
}

// a slice's rows [m0, m1) as TS tiles: each row's A row (row(i)) and routing weight, the last tile's
// missing rows repeating its last one (computed, not stored); returns the number of tiles
template <typename T, typename Row>
int slice_rows(const Layer<T>& L, const Expert<T>& ex, int64_t m0, int64_t m1, const Row& row, const T* (&ar)[TS][R],
               float (&w)[TS][R], int (&nr)[TS]) {
  const int nt = static_cast<int>((m1 - m0 + R - 1) / R);
  for (int t = 0; t < nt; ++t) {
    const int64_t m = m0 + t * R;
    nr[t] = static_cast<int>(std::min<int64_t>(R, m1 - m));
    for (int r = 0; r < R; ++r) {
      const int64_t i = m + std::min(r, nr[t] - 1);
      ar[t][r] = row(ex.tok(i));
      w[t][r] = ex.weight(i, L.w, L.nk);
    }
  }
  return nt;
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

// dst[k · ld + c] = src[c · stride + k] for W columns c and k < K (32-bit units): 16 x 16 blocks through
// the registers on AVX-512, the rest one by one
template <typename U>
void transpose_cols(const U* src, int64_t stride, int64_t K, U* dst, int64_t ld) {
  static_assert(sizeof(U) == 4);
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 16 <= K; k += 16) {
    __m512i r[16];
    for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_si512(src + c * stride + k);
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (k + i) * ld, r[i]);
  }
#endif
  for (; k < K; ++k)
    for (int c = 0; c < W; ++c) dst[k * ld + c] = src[c * stride + k];
}

// The forward's weights transposed into panels (column_blocks): p1 = [gate; up]^T [H][2I], each panel a
// block of gate columns then the same up columns (the SwiGLU's two inputs land in one tile), p2 = down^T
// [I][H]. U is a float (fp32) or the 32 bits of two neighbouring bf16 entries of a weight row, which
// is a pair row's entry of its transpose: the same transposes over rows of Kh = H (or H / 2) and
// Ki = I (or I / 2) units; a panel of column n starts at n·Kh (or n·Ki) units.
template <typename U>
void pack_panels(const U* wg, const U* wu, const U* wd, int64_t H, int64_t I, int64_t Kh, int64_t Ki, U* p1, U* p2) {
  gate_up_blocks(I, [&](auto Cc, int64_t j) {
    constexpr int64_t bw = decltype(Cc)::value / 2 * W;
    U* p = p1 + j * 2 * Kh;
    for (int64_t c = 0; c < bw; c += W) {
      transpose_cols(wg + (j + c) * Kh, Kh, Kh, p + c, 2 * bw);
      transpose_cols(wu + (j + c) * Kh, Kh, Kh, p + bw + c, 2 * bw);
    }
  });
  column_blocks(0, H, [&](auto Cc, int64_t n0) {
    constexpr int64_t bw = decltype(Cc)::value * W;
    for (int64_t c = 0; c < bw; c += W) transpose_cols(wd + (n0 + c) * Ki, Ki, Ki, p2 + n0 * Ki + c, bw);
  });
}

void pack(Expert<float>& ex, int64_t H) { pack_panels(ex.wg, ex.wu, ex.wd, H, ex.I, H, ex.I, ex.p1, ex.p2); }

void pack(Expert<bf16>& ex, int64_t H) {
  const auto u = [](const bf16* p) { return reinterpret_cast<const uint32_t*>(p); };
  pack_panels(u(ex.wg), u(ex.wu), u(ex.wd), H, ex.I, H / 2, ex.I / 2, reinterpret_cast<uint32_t*>(ex.p1),
              reinterpret_cast<uint32_t*>(ex.p2));
}

// rows [m0, m1) of an expert (a slice): gu = x[token] @ [gate; up]^T, h = [silu(g) · u · weight | sigmoid(g)]
// (the backward reads the sigmoid rather than computing it again: its exp was a third of the dh pass)
template <typename T>
void gate_up_rows(const Layer<T>& L, const Expert<T>& ex, int64_t m0, int64_t m1) {
  const int64_t H = L.H, I = ex.I;
  const T* xr[TS][R];
  float w[TS][R];
  int nr[TS];
  const int nt = slice_rows(L, ex, m0, m1, [&](int64_t n) { return L.x + n * H; }, xr, w, nr);
  gate_up_blocks(I, [&](auto Cc, int64_t j) {
    constexpr int C = decltype(Cc)::value, V = C / 2;  // V gate vectors, then V up vectors
    vf acc[TS][R][C] = {};
    slice_tiles(H, nt, xr, ex.p1 + j * 2 * H, C * W, acc);
    for (int t = 0; t < nt; ++t)
      for (int r = 0; r < nr[t]; ++r) {
        const int64_t m = m0 + t * R + r;
        T* gu = ex.gu + m * 2 * I + j;
        T* h = ex.h + m * 2 * I + j;
        for (int v = 0; v < V; ++v) {
          const vf g = acc[t][r][v], u = acc[t][r][V + v];
          store(gu + v * W, g);
          store(gu + I + v * W, u);
          const vf s = sigmoid_v(g);
          store(h + v * W, g * s * u * w[t][r]);
          store(h + I + v * W, s);
        }
      }
  });
}

// out[token, c0 : c1) (+)= Σ over the expert's rows of (a_row @ B)[c0 : c1) (tile_at(acc, rows, n0) adds
// one block's products), the first expert storing; a tile of rows is read once for all the columns
template <typename T, typename ARow, typename Tile>
void scatter_rows(const Expert<T>& ex, float* out, int64_t H, int64_t c0, int64_t c1, bool first, const ARow& arow,
                  const Tile& tile_at) {
  for (int64_t m = 0; m < ex.rows; m += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, ex.rows - m));
    const T* ar[R];
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

// y[:, c0 : c1) = Σ over experts and their rows of h_row @ down^T, by token (y fp32)
template <typename T>
void down_cols(const Layer<T>& L, float* y, int64_t c0, int64_t c1, bool zeroed) {
  const int64_t H = L.H;
  for (size_t e = 0; e < L.experts.size(); ++e) {
    const Expert<T>& ex = L.experts[e];
    if (!ex.rows) continue;
    const int64_t I = ex.I;
    scatter_rows(ex, y, H, c0, c1, e == 0 && !zeroed, [&](int64_t i) { return ex.h + i * 2 * I; },
                 [&](auto& acc, const T* const (&ar)[R], int64_t n0) {
                   constexpr int C = std::extent_v<std::remove_reference_t<decltype(acc[0])>>;
                   mm_tile(I, ar, ex.p2 + n0 * I, C * W, acc);
                 });
  }
}

// an fp32 sum's tensor in x's dtype: itself, or a new bf16 one (round_cols fills it)
template <typename T>
at::Tensor like_x(const at::Tensor& t) { return std::is_same_v<T, float> ? t : at::empty(t.sizes(), t.options().dtype(scalar_type<T>())); }

// out[:, c0 : c1) = sum[:, c0 : c1) rounded to bf16 (fp32: out is sum)
inline void round_cols(const float*, float*, int64_t, int64_t, int64_t, int64_t) {}
inline void round_cols(const float* sum, bf16* out, int64_t N, int64_t H, int64_t c0, int64_t c1) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = c0; c < c1; c += W) store(out + n * H + c, load<vf>(sum + n * H + c));
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_fwd(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& token, const at::Tensor& pair,
    const at::Tensor& counts, const at::Tensor& w1, const at::Tensor& w2, const c10::optional<at::Tensor>& sg,
    const c10::optional<at::Tensor>& su, const c10::optional<at::Tensor>& sd) {
  Layer<T> L = describe<T>(x, weights, token, pair, counts, w1, w2, sg, su, sd);
  const int64_t N = L.N, H = L.H, I = w1.size(1) / 2;
  const bool shared = sg.has_value() && sg->defined();
  const int64_t Is = shared ? sg->size(0) : 0;
  at::Tensor gu = at::empty({token.numel(), 2 * I}, x.options()), h = at::empty_like(gu);
  at::Tensor sgu = at::empty({shared ? N : 0, 2 * Is}, x.options()), sh = at::empty_like(sgu);
  point_rows(L, gu, h, sgu, sh);
  int64_t packed = 0;
  for (const Expert<T>& ex : L.experts) packed += 3 * ex.I * H;
  at::Tensor buf = at::empty({packed}, x.options());
  T* p = ptr<T>(buf);
  for (Expert<T>& ex : L.experts) {
    ex.p1 = p, ex.p2 = p + 2 * ex.I * H;
    p += 3 * ex.I * H;
  }
  run_tasks(L.experts.size(), [&](int64_t e) { pack(L.experts[e], H); });
  run_row_tasks(L, [&](const Expert<T>& ex, int64_t m0, int64_t m1) { gate_up_rows(L, ex, m0, m1); });
  const bool zeroed = !shared;  // the shared expert's rows are every token: it stores, the others add
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = zeroed ? at::zeros({N, H}, f32) : at::empty({N, H}, f32), yo = like_x<T>(y);
  float* yp = y.data_ptr<float>();
  column_tasks(H, [&](int64_t c0, int64_t c1) {
    down_cols(L, yp, c0, c1, zeroed);
    round_cols(yp, ptr<T>(yo), N, H, c0, c1);
  });
  return {yo, gu, h, sgu, sh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& token, const at::Tensor& pair,
    const at::Tensor& counts, const at::Tensor& w1, const at::Tensor& w2, const c10::optional<at::Tensor>& sg,
    const c10::optional<at::Tensor>& su, const c10::optional<at::Tensor>& sd) {
  if (x.scalar_type() == at::kFloat) return experts_fwd<float>(x, weights, token, pair, counts, w1, w2, sg, su, sd);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "moe_experts: x must be fp32 or bf16");
  TORCH_CHECK(NATIVE_BF16, "moe_experts: bf16 needs a CPU with AVX512_BF16 (this build has none)");
  return experts_fwd<bf16>(x, weights, token, pair, counts, w1, w2, sg, su, sd);
}

// ---- backward ----

// rows [m0, m1) of an expert (a slice): dh = dy[token] @ down (not kept), through the SwiGLU to dgu, and
// the routing weight's gradient Σ_i dh · silu(g) · u into dw[pair]
template <typename T>
void down_bwd_rows(const Layer<T>& L, const Expert<T>& ex, const T* dy, float* dw, int64_t m0, int64_t m1) {
  const int64_t H = L.H, I = ex.I;
  const T* dr[TS][R];
  float w[TS][R];
  int nr[TS];
  const int nt = slice_rows(L, ex, m0, m1, [&](int64_t n) { return dy + n * H; }, dr, w, nr);
  vf dsum[TS][R] = {};
  column_blocks(0, I, [&](auto Cc, int64_t j) {
    constexpr int C = decltype(Cc)::value;
    vf acc[TS][R][C] = {};
    slice_tiles(H, nt, dr, ex.bd + col<T>(j), I, acc);
    for (int t = 0; t < nt; ++t)
      for (int r = 0; r < nr[t]; ++r) {
        const int64_t m = m0 + t * R + r;
        const T* gu = ex.gu + m * 2 * I;
        const T* sig = ex.h + m * 2 * I + I;
        T* dgu = ex.dgu + m * 2 * I;
        for (int c = 0; c < C; ++c) {
          const int64_t i = j + c * W;
          const vf g = load_n(gu + i, W), u = load_n(gu + I + i, W), dh = acc[t][r][c];
          const vf s = load_n(sig + i, W), silu = g * s;
          dsum[t][r] += dh * silu * u;
          store(dgu + i, dh * w[t][r] * u * s * (1.f + g * (1.f - s)));
          store(dgu + I + i, dh * w[t][r] * silu);
        }
      }
  });
  if (ex.pair)
    for (int t = 0; t < nt; ++t)
      for (int r = 0; r < nr[t]; ++r) {
        const int64_t m = m0 + t * R + r;
        if (ex.pair[m] < L.nk) dw[ex.pair[m]] = hsum(dsum[t][r]);
      }
}

constexpr int64_t KC = 256;  // rows of an expert per pass of a weight gradient: their [KC, N] operand stays in L2

// dst = Σ_k a_k^T b_k over the expert's rows k for an [M, N] weight gradient: arow(k) the k-th row's M
// entries (dy through the token table, or dgu), brow(k) its N entries (x through the token table, or
// h), drow(j) output row j's running sum (fp32), orow(j) its final value (after the last block). Blocks
// of KC rows outermost, so a block's rows are read from L2 for every output row block, not from memory.
// tile_at.start(kb, kn) readies a block, tile_at(acc, kb, kn, off, n) adds one tile's products: fp32
// reads both operands in place (InPlace), bf16 packs the block's rows in pairs first (Paired).
template <typename D, typename O, typename TileAt>
void weight_grad_rows(int64_t rows, int64_t M, int64_t N, const D& drow, const O& orow, const TileAt& tile_at) {
  for (int64_t kb = 0; kb < std::max<int64_t>(rows, 1); kb += KC) {
    const int64_t kn = std::min(KC, rows - kb);
    const bool last = kb + KC >= rows;
    tile_at.start(kb, kn);
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
        tile_at(acc, kb, kn, off, n);
        for (int r = 0; r < nr; ++r)
          for (int c = 0; c < C; ++c) {
            if (last) store(orow(j0 + r) + n + c * W, acc[r][c]);
            else store(dst[r] + n + c * W, acc[r][c]);
          }
      });
    }
  }
}

// fp32: both operands read in place, a_k's entries at off[r]
template <typename A, typename B>
struct InPlace {
  const A& arow;
  const B& brow;
  void start(int64_t, int64_t) const {}
  template <int C>
  void operator()(vf (&acc)[R][C], int64_t kb, int64_t kn, const int64_t (&off)[R], int64_t n) const {
    tile(kn, [&](int r, int64_t k) { return arow(kb + k)[off[r]]; }, [&](int64_t k) { return brow(kb + k) + n; }, acc);
  }
};

// bf16: a block's rows of both operands packed as pair rows (an odd last row paired with zeros), then
// a_k's pairs broadcast at off[r]
template <typename A, typename B>
struct Paired {
  const A& arow;
  const B& brow;
  int64_t M, N;
  mutable std::vector<bf16> pa, pb;
  void start(int64_t kb, int64_t kn) const {
    pa.resize((KC + 1) / 2 * 2 * M), pb.resize((KC + 1) / 2 * 2 * N);
    for (int64_t k = 0; k < kn; k += 2) {
      const bool two = k + 1 < kn;
      interleave(arow(kb + k), two ? arow(kb + k + 1) : nullptr, M, pa.data() + k * M);
      interleave(brow(kb + k), two ? brow(kb + k + 1) : nullptr, N, pb.data() + k * N);
    }
  }
  template <int C>
  void operator()(vf (&acc)[R][C], int64_t, int64_t kn, const int64_t (&off)[R], int64_t n) const {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    const bf16 *a = pa.data(), *b = pb.data();
    tile_bf16((kn + 1) / 2, [&](int r, int64_t p) { return pair_at(a + 2 * p * M + 2 * off[r]); },
              [&](int64_t p) { return b + 2 * p * N + 2 * n; }, acc);
#endif
  }
};

template <typename T, typename A, typename B, typename D, typename O>
void weight_grad(int64_t rows, int64_t M, int64_t N, const A& arow, const B& brow, const D& drow, const O& orow) {
  if constexpr (std::is_same_v<T, float>) weight_grad_rows(rows, M, N, drow, orow, InPlace<A, B>{arow, brow});
  else weight_grad_rows(rows, M, N, drow, orow, Paired<A, B>{arow, brow, M, N, {}, {}});
}

// the down weight's gradient [H, I]: Σ over the expert's rows of dy[token]^T h_row
template <typename T>
void down_grad(const Layer<T>& L, const Expert<T>& ex, const T* dy) {
  const int64_t H = L.H, I = ex.I;
  weight_grad<T>(ex.rows, H, I, [&](int64_t k) { return dy + ex.tok(k) * H; }, [&](int64_t k) { return ex.h + k * 2 * I; },
                 [&](int64_t j) { return ex.dwd + j * I; }, [&](int64_t j) { return ex.owd + j * I; });
}

// [gate; up]'s gradient [2I, H]: Σ over the expert's rows of dgu_row^T x[token]
template <typename T>
void gate_up_grad(const Layer<T>& L, const Expert<T>& ex) {
  const int64_t H = L.H, I = ex.I;
  weight_grad<T>(ex.rows, 2 * I, H, [&](int64_t k) { return static_cast<const T*>(ex.dgu + k * 2 * I); },
                 [&](int64_t k) { return L.x + ex.tok(k) * H; },
                 [&](int64_t j) { return j < I ? ex.dwg + j * H : ex.dwu + (j - I) * H; },
                 [&](int64_t j) { return j < I ? ex.owg + j * H : ex.owu + (j - I) * H; });
}

// dx[:, c0 : c1) = Σ over experts and their rows of dgu_row @ [gate; up], by token (dx fp32)
template <typename T>
void gate_up_bwd_cols(const Layer<T>& L, float* dx, int64_t c0, int64_t c1, bool zeroed) {
  const int64_t H = L.H;
  for (size_t e = 0; e < L.experts.size(); ++e) {
    const Expert<T>& ex = L.experts[e];
    if (!ex.rows) continue;
    const int64_t I = ex.I;
    scatter_rows(ex, dx, H, c0, c1, e == 0 && !zeroed, [&](int64_t i) { return static_cast<const T*>(ex.dgu + i * 2 * I); },
                 [&](auto& acc, const T* const (&ar)[R], int64_t n0) {
                   if (ex.bu == ex.bg + I * H) {  // gate and up as one operand [2I][H]: one pass over K = 2I
                     mm_tile(2 * I, ar, ex.bg + col<T>(n0), H, acc);
                     return;
                   }
                   const T* au[R];
                   for (int r = 0; r < R; ++r) au[r] = ar[r] + I;
                   mm_tile(I, ar, ex.bg + col<T>(n0), H, acc);
                   mm_tile(I, au, ex.bu + col<T>(n0), H, acc);
                 });
  }
}

// The backward's B operands: fp32 reads the weights in place; bf16 packs down [H, I] as pair rows of
// H, gate and up [I, H] as pair rows of I (into buf, 3·I·H entries)
void backward_operands(Expert<float>& ex, int64_t, float*) { ex.bd = ex.wd, ex.bg = ex.wg, ex.bu = ex.wu; }

void backward_operands(Expert<bf16>& ex, int64_t H, bf16* buf) {
  const int64_t I = ex.I;
  bf16 *bd = buf, *bg = buf + H * I, *bu = bg + I * H;
  for (int64_t k = 0; k < H; k += 2) interleave(ex.wd + k * I, ex.wd + (k + 1) * I, I, bd + k * I);
  for (int64_t k = 0; k < I; k += 2) {
    interleave(ex.wg + k * H, ex.wg + (k + 1) * H, H, bg + k * H);
    interleave(ex.wu + k * H, ex.wu + (k + 1) * H, H, bu + k * H);
  }
  ex.bd = bd, ex.bg = bg, ex.bu = bu;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& token,
    const at::Tensor& pair, const at::Tensor& counts, const at::Tensor& w1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& su, const c10::optional<at::Tensor>& sd,
    const at::Tensor& gu, const at::Tensor& h, const at::Tensor& sgu, const at::Tensor& sh) {
  Layer<T> L = describe<T>(x, weights, token, pair, counts, w1, w2, sg, su, sd);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous(),
              "moe_experts_bwd: dy must be like x");
  const int64_t N = L.N, H = L.H, I = w1.size(1) / 2;
  const bool shared = sg.has_value() && sg->defined();
  const int64_t Is = shared ? sg->size(0) : 0;
  TORCH_CHECK(gu.sizes() == at::IntArrayRef({token.numel(), 2 * I}) && h.sizes() == gu.sizes() &&
              sgu.sizes() == at::IntArrayRef({shared ? N : 0, 2 * Is}) && sh.sizes() == sgu.sizes(),
              "moe_experts_bwd: saved rows do not match the layer");
  for (const at::Tensor* t : {&gu, &h, &sgu, &sh})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "moe_experts_bwd: saved rows must be of x's dtype");
  at::Tensor gu_ = gu.contiguous(), h_ = h.contiguous(), sgu_ = sgu.contiguous(), sh_ = sh.contiguous();
  point_rows(L, gu_, h_, sgu_, sh_);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dgu = at::empty_like(gu_), sdgu = at::empty_like(sgu_);
  // weight gradients summed in fp32 (bf16: rounded once, at the end; the fp32 sums' pages are touched
  // only by experts with more than KC rows)
  at::Tensor dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  at::Tensor dsg = shared ? at::empty_like(*sg) : at::Tensor(), dsu = shared ? at::empty_like(*su) : at::Tensor();
  at::Tensor dsd = shared ? at::empty_like(*sd) : at::Tensor();
  const auto sums = [&](const at::Tensor& t) { return !t.defined() || std::is_same_v<T, float> ? t : at::empty(t.sizes(), f32); };
  at::Tensor sw1 = sums(dw1), sw2 = sums(dw2), ssg = sums(dsg), ssu = sums(dsu), ssd = sums(dsd);
  at::Tensor dweights = at::zeros_like(weights);
  int64_t operands = 0;
  for (const Expert<T>& ex : L.experts) operands += std::is_same_v<T, float> ? 0 : 3 * ex.I * H;
  at::Tensor buf = at::empty({operands}, x.options());
  {
    size_t e = 0;
    if (shared) {
      Expert<T>& s = L.experts[0];
      s.dgu = ptr<T>(sdgu), s.dwg = ssg.data_ptr<float>(), s.dwu = ssu.data_ptr<float>(), s.dwd = ssd.data_ptr<float>();
      s.owg = ptr<T>(dsg), s.owu = ptr<T>(dsu), s.owd = ptr<T>(dsd);
      e = 1;
    }
    int64_t row0 = 0;
    for (int64_t r = 0; e < L.experts.size(); ++e, ++r) {
      Expert<T>& ex = L.experts[e];
      ex.dgu = ptr<T>(dgu) + row0 * 2 * I;
      ex.dwg = sw1.data_ptr<float>() + r * 2 * I * H, ex.dwu = ex.dwg + I * H, ex.dwd = sw2.data_ptr<float>() + r * H * I;
      ex.owg = ptr<T>(dw1) + r * 2 * I * H, ex.owu = ex.owg + I * H, ex.owd = ptr<T>(dw2) + r * H * I;
      row0 += ex.rows;
    }
    T* p = ptr<T>(buf);
    std::vector<T*> at_(L.experts.size());
    for (size_t i = 0; i < L.experts.size(); ++i) at_[i] = p, p += std::is_same_v<T, float> ? 0 : 3 * L.experts[i].I * H;
    run_tasks(L.experts.size(), [&](int64_t i) { backward_operands(L.experts[i], H, at_[i]); });
  }
  const T* dyp = ptr<const T>(dy);
  float* dwp = dweights.data_ptr<float>();
  run_row_tasks(L, [&](const Expert<T>& ex, int64_t m0, int64_t m1) { down_bwd_rows(L, ex, dyp, dwp, m0, m1); });
  run_tasks(2 * L.experts.size(), [&](int64_t t) {  // one task per weight gradient
    if (t % 2) down_grad(L, L.experts[t / 2], dyp);
    else gate_up_grad(L, L.experts[t / 2]);
  });
  const bool zeroed = !shared;
  at::Tensor dx = zeroed ? at::zeros({N, H}, f32) : at::empty({N, H}, f32), dxo = like_x<T>(dx);
  float* dxp = dx.data_ptr<float>();
  column_tasks(H, [&](int64_t c0, int64_t c1) {
    gate_up_bwd_cols(L, dxp, c0, c1, zeroed);
    round_cols(dxp, ptr<T>(dxo), N, H, c0, c1);
  });
  return {dxo, dweights, dw1, dw2, dsg, dsu, dsd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& token,
    const at::Tensor& pair, const at::Tensor& counts, const at::Tensor& w1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& su, const c10::optional<at::Tensor>& sd,
    const at::Tensor& gu, const at::Tensor& h, const at::Tensor& sgu, const at::Tensor& sh) {
  if (x.scalar_type() == at::kFloat)
    return experts_bwd<float>(dy, x, weights, token, pair, counts, w1, w2, sg, su, sd, gu, h, sgu, sh);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "moe_experts_bwd: x must be fp32 or bf16");
  TORCH_CHECK(NATIVE_BF16, "moe_experts_bwd: bf16 needs a CPU with AVX512_BF16 (this build has none)");
  return experts_bwd<bf16>(dy, x, weights, token, pair, counts, w1, w2, sg, su, sd, gu, h, sgu, sh);
}

bool moe_bf16() { return NATIVE_BF16; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("moe_experts(Tensor x, Tensor weights, Tensor token, Tensor pair, Tensor counts, Tensor w1, Tensor w2, "
        "Tensor? sg, Tensor? su, Tensor? sd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_experts_bwd(Tensor dy, Tensor x, Tensor weights, Tensor token, Tensor pair, Tensor counts, Tensor w1, "
        "Tensor w2, Tensor? sg, Tensor? su, Tensor? sd, Tensor gu, Tensor h, Tensor sgu, Tensor sh) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_bf16() -> bool");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("moe_experts", &moe_experts);
  m.impl("moe_experts_bwd", &moe_experts_bwd);
}

TORCH_LIBRARY_IMPL(nanoseek, CompositeExplicitAutograd, m) { m.impl("moe_bf16", &moe_bf16); }
