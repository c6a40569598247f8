// Weight-only GEMV/GEMM for decode on CPU: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), x in fp32,
// W stored as fp16, bf16, int8 (one scale per output row) or int4 (groups of 32, fp16 scale and
// minimum per group, as llama.cpp's Q4_1). Built by nanoseek/infer/kernels.py at first use with
// -O3 -march=native, so the vector width is the machine's own (16 floats on AVX-512, 8 on AVX2).
//
// Decode reads every weight once per step and does almost nothing else, so the kernel is written
// for that: each weight vector is decoded to fp32 once and multiplied into up to MB rows of x,
// NB output rows at a time (NB * MB independent accumulators hide the FMA latency), and the output
// rows are split across threads with at::parallel_for (needs -fopenmp: it is a header template).
// int8 and int4 skip the conversion: integer dot products against activations rounded to 16 / 15 bits
// (below). From 16 rows of x on, CPUs with AMX multiply fp16, bf16 and int4 weights on bf16 tiles
// (run_amx) and int8 weights on int8 tiles (run_amx_i8).
// Registered as torch.ops.nanoseek.wmm. Also here: attention for decode (one query per row
// against the KV cache, decode_attention) and for training on short windows (attention_fwd / _bwd).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

enum Kind { F16 = 0, BF16 = 1, I8 = 2, I4 = 3, F32 = 4 };

// int8 weights run as integer dot products against the activations rounded to int16 (one scale per
// row: error <= 2^-16 of the row's largest value, below fp16's rounding). vpdpwssd (AVX512-VNNI) or
// vpmaddwd do 32 (16 on AVX2) multiply-adds per instruction where the float path converts every
// weight to fp32 first. int32 lanes add 2 * 127 * 32767 per step: exact up to K = 8192.
#if defined(__AVX512BW__) || defined(__AVX2__)
#define HAVE_I16_DOT 1
constexpr int64_t I16_DOT_MAX_K = 8192;
#else
#define HAVE_I16_DOT 0
#endif

// rounding activations to integers (the int8 and int4 paths): a row's or group's largest magnitude,
// x * inv to the nearest integer within +-levels, and q = 256 h + l as two int8 digits (l in
// [-128, 127]; |q| <= 32639 = 127 * 257 keeps h in int8)
static inline float max_abs(const float* x, int64_t n) {
  float mx = 0.f;
  for (int64_t k = 0; k < n; ++k) mx = std::max(mx, std::fabs(x[k]));
  return mx;
}
static inline int round_to(float x, float inv, int levels) {
  return std::clamp(static_cast<int>(std::nearbyint(x * inv)), -levels, levels);
}
static inline void split_digits(int q, int8_t& hi, int8_t& lo) {
  const int h = (q + 128) >> 8;  // floor
  hi = static_cast<int8_t>(h), lo = static_cast<int8_t>(q - 256 * h);
}

constexpr int PF = 2;  // prefetch distance: blocks of NB rows, or rows of one stream (run sets Args::pf_bytes)
static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

static inline float half_to_float(at::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// the conversions in intrinsics where GCC's generic vector code would go element by element
static inline vf f16_to_f32(const uint8_t* p) {
#if defined(__AVX512F__)
  return bit_cast<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__AVX2__) && defined(__F16C__)
  return bit_cast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return __builtin_convertvector(load<vh>(p), vf);
#endif
}

static inline vf i8_to_f32(const uint8_t* p) {
#if defined(__AVX512F__)
  return bit_cast<vf>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  return bit_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  return __builtin_convertvector(load<vi8>(p), vf);
#endif
}

static inline vf u8_to_f32(vu8 b) {
#if defined(__AVX512F__)
  return bit_cast<vf>(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bit_cast<__m128i>(b))));
#elif defined(__AVX2__)
  __m128i v = _mm_setzero_si128();
  std::memcpy(&v, &b, sizeof(b));
  return bit_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)));
#else
  return __builtin_convertvector(b, vf);
#endif
}

// W consecutive weights of row `row` starting at column k, as fp32
template <int KIND>
static inline vf decode(const uint8_t* row, int64_t k) {
  if constexpr (KIND == F16) {
    return f16_to_f32(row + 2 * k);
  } else if constexpr (KIND == BF16) {
    return bf16_to_f32(row + 2 * k);
  } else if constexpr (KIND == I8) {
    return i8_to_f32(row + k);
  } else {
    return load<vf>(row + 4 * k);
  }
}

// int4, one group of 32 stored in 16 bytes: byte i holds element i (low nibble) and i + 16 (high)
static inline void decode_q4(const uint8_t* g, int half_w, vf& lo, vf& hi) {
  vu8 b = load<vu8>(g + half_w);
  lo = u8_to_f32(b & 15);
  hi = u8_to_f32(b >> 4);
}

// int4 weights run as integer dot products too: vpdpbusd (AVX512-VNNI) or vpmaddubsw + vpmaddwd
// multiply 4-bit codes by 8-bit numbers, 64 (32 on AVX2) per instruction, where the float path
// converted every code to fp32 and scaled it. The activations are rounded per group of 32 to 15 bits
// (scale max|x| / 32639) and split into two signed 8-bit digits, q = 256 hi + lo, each multiplied
// in one instruction: rounding them to 8 bits instead, as llama.cpp's Q4_1 x Q8_1 does, cost SmolLM2
// 1.3 points of perplexity (+5.3% against fp32 where this path measures +4.0%, as float activations
// do). On AVX-512 one vector holds two groups (QG), so K must be a multiple of 64.
#if (defined(__AVX512BW__) || (defined(__AVX2__) && !defined(__AVX512F__))) && defined(__F16C__)
#define HAVE_Q4_DOT 1
#else
#define HAVE_Q4_DOT 0
#endif
#if defined(__AVX512BW__)
constexpr int QG = 2;
#else
constexpr int QG = 1;
#endif

struct Args;
template <int NB, int MB>
static void block_i8_i16(const Args& a, int64_t n0, int64_t m0);
template <int NB, int MB>
static void block_q4_x15(const Args& a, int64_t n0, int64_t m0);

struct Args {
  const float* x;  // [M, K]
  const uint8_t* w;
  int64_t row_bytes;           // bytes per weight row
  const float* scale;          // I8: [N]
  const at::Half* qscale;      // I4: [N, K/32] scale and minimum
  const at::Half* qmin;
  const float* xsum;           // I4: [M, K/32] sums of x over each group
  const float* bias;           // [N] or null
  const int16_t* xq;           // I8: x rounded to int16 [M, K] (null: the float path)
  const float* xq_scale;       // [M]
  const int8_t* x16_hi;        // I8 with VNNI: x rounded to 16 bits as two int8 digits [M, K] each (null: not used)
  const int8_t* x16_lo;
  const int64_t* x16_sum;      // [M]: the sum of each row's rounded values (undoes the weights' +128)
  const int8_t* x15_hi;           // I4: x rounded to 15 bits per group of 32, high digits [M, K] (null: float path)
  const int8_t* x15_lo;        // I4: and the low digits [M, K]
  const float* x15_scale;      // [M, K/32/QG, W]: each group's scale, laid out as the dot's lanes
  float* y;                    // [M, N]
  int64_t M, N, K;
  int64_t rs;                  // a block's NB rows are n0, n0 + rs, ... (see run)
  int64_t pf_bytes;            // prefetch this far ahead of the row being read
};

// the i-th weight row of the block starting at n0
static inline int64_t row_of(const Args& a, int64_t n0, int i) { return n0 + i * a.rs; }

// int8 weights on AVX512-VNNI: the activations rounded to 16 bits (as the int16 path below) and split
// into two signed digits, q = 256 h + l, h and l in [-128, 127]; vpdpbusd multiplies 64 unsigned bytes
// by 64 signed ones per instruction, so the weights go in as w + 128 (a xor of the sign bit) and
// sum(w q) = 256 dot(w + 128, h) + dot(w + 128, l) - 128 sum(q). Two multiply-adds per 64 weights
// where the int16 path sign-extends them first (two conversions and two vpdpwssd).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_I8_VNNI 1
static void round_rows_to_digits(const float* x, int64_t M, int64_t K, int8_t* hi, int8_t* lo, float* scale,
                                 int64_t* sum) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    const float s = std::max(max_abs(r, K), 1e-30f) / 32639.f, inv = 1.f / s;
    int64_t total = 0, k = 0;
#if defined(__AVX512BW__)
    __m512i vsum = _mm512_setzero_si512();  // 16 values at a time, the same roundings (to nearest, even)
    for (; k + 16 <= K; k += 16) {
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r + k), _mm512_set1_ps(inv)));
      q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(32639)), _mm512_set1_epi32(-32639));
      const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + m * K + k), _mm512_cvtepi32_epi8(h));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + m * K + k), _mm512_cvtepi32_epi8(_mm512_sub_epi32(q, _mm512_slli_epi32(h, 8))));
      vsum = _mm512_add_epi32(vsum, q);  // |sum| per lane <= 32639 * K / 16: no overflow at K <= 8192
    }
    total = _mm512_reduce_add_epi32(vsum);
#endif
    for (; k < K; ++k) {
      const int q = round_to(r[k], inv, 32639);
      split_digits(q, hi[m * K + k], lo[m * K + k]);
      total += q;
    }
    scale[m] = s;
    sum[m] = total;
  }
}

template <int NB, int MB>
static void block_i8_vnni(const Args& a, int64_t n0, int64_t m0) {
  if constexpr (MB > 2) {  // two sums per (row, x row): 4 x 4 pairs would spill out of the 32 registers
    block_i8_vnni<NB, 2>(a, n0, m0);  // the block's weights are read again, from L1
    block_i8_vnni<NB, MB - 2>(a, n0, m0 + 2);
    return;
  }
  __m512i ah[NB][MB], al[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) ah[i][j] = al[i][j] = _mm512_setzero_si512();
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < a.K; k += 64) {
    __m512i w[NB];
    for (int i = 0; i < NB; ++i) {
      const int8_t* row = reinterpret_cast<const int8_t*>(a.w + row_of(a, n0, i) * a.row_bytes) + k;
      prefetch(row + a.pf_bytes);
      w[i] = _mm512_xor_si512(_mm512_loadu_si512(row), sign);  // w + 128, as unsigned bytes
    }
    for (int j = 0; j < MB; ++j) {
      const __m512i h = _mm512_loadu_si512(a.x16_hi + (m0 + j) * a.K + k);
      const __m512i l = _mm512_loadu_si512(a.x16_lo + (m0 + j) * a.K + k);
      for (int i = 0; i < NB; ++i) {
        ah[i][j] = _mm512_dpbusd_epi32(ah[i][j], w[i], h);
        al[i][j] = _mm512_dpbusd_epi32(al[i][j], w[i], l);
      }
    }
  }
  for (int i = 0; i < NB; ++i) {
    const int64_t n = row_of(a, n0, i);
    const float b = a.bias ? a.bias[n] : 0.f;
    for (int j = 0; j < MB; ++j) {
      const int64_t dot = 256 * static_cast<int64_t>(_mm512_reduce_add_epi32(ah[i][j])) +
                          _mm512_reduce_add_epi32(al[i][j]) - 128 * a.x16_sum[m0 + j];
      a.y[(m0 + j) * a.N + n] = static_cast<float>(dot) * a.xq_scale[m0 + j] * a.scale[n] + b;
    }
  }
}
#else
#define HAVE_I8_VNNI 0
#endif

template <int KIND, int NB, int MB>
static void block(const Args& a, int64_t n0, int64_t m0) {
#if HAVE_I16_DOT
  if constexpr (KIND == I8) {
#if HAVE_I8_VNNI
    if (a.x16_hi) return block_i8_vnni<NB, MB>(a, n0, m0);
#endif
    if (a.xq) return block_i8_i16<NB, MB>(a, n0, m0);
  }
#endif
#if HAVE_Q4_DOT
  if constexpr (KIND == I4) {
    if (a.x15_hi) return block_q4_x15<NB, MB>(a, n0, m0);
  }
#endif
  vf acc[NB][MB] = {};
  const uint8_t* rows[NB];
  for (int i = 0; i < NB; ++i) rows[i] = a.w + row_of(a, n0, i) * a.row_bytes;
  const float* xs[MB];
  for (int j = 0; j < MB; ++j) xs[j] = a.x + (m0 + j) * a.K;
  float extra[NB][MB] = {};
  if constexpr (KIND == I4) {
    const int64_t G = a.K / 32;
    for (int64_t g = 0; g < G; ++g) {
      float s[NB];
      for (int i = 0; i < NB; ++i) {
        s[i] = half_to_float(a.qscale[row_of(a, n0, i) * G + g]);
        const float mn = half_to_float(a.qmin[row_of(a, n0, i) * G + g]);
        for (int j = 0; j < MB; ++j) extra[i][j] += mn * a.xsum[(m0 + j) * G + g];
      }
      if (g % 4 == 0)
        for (int i = 0; i < NB; ++i) prefetch(rows[i] + a.pf_bytes + 16 * g);
      for (int h = 0; h < 16; h += W) {  // W = 16: one pass; W = 8: two
        vf wl[NB], wh[NB];
        for (int i = 0; i < NB; ++i) {
          decode_q4(rows[i] + 16 * g, h, wl[i], wh[i]);
          wl[i] *= s[i];
          wh[i] *= s[i];
        }
        for (int j = 0; j < MB; ++j) {
          const vf xl = load<vf>(xs[j] + 32 * g + h), xh = load<vf>(xs[j] + 32 * g + 16 + h);
          for (int i = 0; i < NB; ++i) acc[i][j] += wl[i] * xl + wh[i] * xh;
        }
      }
    }
  } else {
    constexpr int64_t bytes_per_k = KIND == I8 ? 1 : KIND == F32 ? 4 : 2;
    for (int64_t k = 0; k < a.K; k += W) {
      vf wv[NB];
      for (int i = 0; i < NB; ++i) {
        // the same columns of the next block of rows: DRAM latency hides behind this block's work
        if ((k * bytes_per_k) % 64 == 0) prefetch(rows[i] + a.pf_bytes + k * bytes_per_k);
        wv[i] = decode<KIND>(rows[i], k);
      }
      for (int j = 0; j < MB; ++j) {
        const vf xv = load<vf>(xs[j] + k);
        for (int i = 0; i < NB; ++i) acc[i][j] += wv[i] * xv;
      }
    }
  }
  for (int i = 0; i < NB; ++i) {
    const int64_t n = row_of(a, n0, i);
    const float sc = KIND == I8 ? a.scale[n] : 1.f;
    const float b = a.bias ? a.bias[n] : 0.f;
    for (int j = 0; j < MB; ++j) a.y[(m0 + j) * a.N + n] = hsum(acc[i][j]) * sc + extra[i][j] + b;
  }
}

#if HAVE_I16_DOT
#if defined(__AVX512BW__)
typedef __m512i vacc;
constexpr int KSTEP = 32;
static inline vacc i16_dot(vacc acc, const int8_t* w, const int16_t* x) {
  const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  const __m512i xv = _mm512_loadu_si512(x);
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, wv, xv);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(wv, xv));
#endif
}
static inline int64_t hsum_i32(vacc v) { return _mm512_reduce_add_epi32(v); }
#else
typedef __m256i vacc;
constexpr int KSTEP = 16;
static inline vacc i16_dot(vacc acc, const int8_t* w, const int16_t* x) {
  const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(wv, xv));
}
static inline int64_t hsum_i32(vacc v) {
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  int64_t s = 0;
  for (int i = 0; i < 8; ++i) s += t[i];
  return s;
}
#endif

template <int NB, int MB>
static void block_i8_i16(const Args& a, int64_t n0, int64_t m0) {
  vacc acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) std::memset(&acc[i][j], 0, sizeof(vacc));
  for (int64_t k = 0; k < a.K; k += KSTEP) {
    for (int i = 0; i < NB; ++i) {
      const int8_t* w = reinterpret_cast<const int8_t*>(a.w + row_of(a, n0, i) * a.row_bytes) + k;
      if (k % 64 == 0) prefetch(w + a.pf_bytes);
      for (int j = 0; j < MB; ++j) acc[i][j] = i16_dot(acc[i][j], w, a.xq + (m0 + j) * a.K + k);
    }
  }
  for (int i = 0; i < NB; ++i) {
    const int64_t n = row_of(a, n0, i);
    const float b = a.bias ? a.bias[n] : 0.f;
    for (int j = 0; j < MB; ++j)
      a.y[(m0 + j) * a.N + n] = static_cast<float>(hsum_i32(acc[i][j])) * a.xq_scale[m0 + j] * a.scale[n] + b;
  }
}
#endif

#if HAVE_I16_DOT
// each row of x [M, K] as int16 times one scale per row: scale = max|x_row| / 32767, rounded to nearest
static void round_rows_to_i16(const float* x, int64_t M, int64_t K, int16_t* xq, float* scale) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    const float s = std::max(max_abs(r, K), 1e-30f) / 32767.f, inv = 1.f / s;
    for (int64_t k = 0; k < K; ++k) xq[m * K + k] = static_cast<int16_t>(round_to(r[k], inv, 32767));
    scale[m] = s;
  }
}
#endif

#if HAVE_Q4_DOT
#if defined(__AVX512BW__)
typedef __m512i vq;
// two groups' 16 code bytes -> 64 codes, as 128-bit lanes [g 0:16, g+1 0:16, g 16:32, g+1 16:32]
static inline vq unpack_q4(const uint8_t* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), m = _mm256_set1_epi8(15);
  const __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
static inline __m512i dot_u8s8(vq w, const int8_t* x) {
  const __m512i xv = _mm512_loadu_si512(x);
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
#else
  return _mm512_madd_epi16(_mm512_maddubs_epi16(w, xv), _mm512_set1_epi16(1));
#endif
}
// codes times the 15-bit activations (256 hi + lo), as fp32; int32 lane l sums 4 products: lanes
// 0-3 and 8-11 are group g, 4-7 and 12-15 group g + 1
static inline vf dot_q4_x15(vq w, const int8_t* hi, const int8_t* lo) {
  const __m512i d = _mm512_add_epi32(_mm512_slli_epi32(dot_u8s8(w, hi), 8), dot_u8s8(w, lo));
  return bit_cast<vf>(_mm512_cvtepi32_ps(d));
}
// the two groups' weight scales, spread as dot_u8s8's lanes
static inline vf q4_scales(const at::Half* s) {
  uint32_t bits;
  std::memcpy(&bits, s, 4);
  const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(bits)));
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
  return bit_cast<vf>(_mm512_permutexvar_ps(idx, _mm512_castps128_ps512(f)));
}
// where element t of group g goes in the rounded activations (the lanes unpack_q4 makes)
static inline int64_t x15_pos(int64_t g, int t) { return (g / 2) * 64 + (t / 16) * 32 + (g % 2) * 16 + t % 16; }
static inline int x15_lane_group(int lane) { return (lane / 4) % 2; }
#else
typedef __m256i vq;
static inline vq unpack_q4(const uint8_t* p) {  // one group: codes 0..31 in order
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}
static inline __m256i dot_u8s8(vq w, const int8_t* x) {  // pairs: 2 * 15 * 128 fits int16
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), _mm256_set1_epi16(1));
}
static inline vf dot_q4_x15(vq w, const int8_t* hi, const int8_t* lo) {
  const __m256i d = _mm256_add_epi32(_mm256_slli_epi32(dot_u8s8(w, hi), 8), dot_u8s8(w, lo));
  return bit_cast<vf>(_mm256_cvtepi32_ps(d));
}
static inline vf q4_scales(const at::Half* s) { return bit_cast<vf>(_mm256_set1_ps(half_to_float(*s))); }
static inline int64_t x15_pos(int64_t g, int t) { return g * 32 + t; }
static inline int x15_lane_group(int) { return 0; }
#endif

// sum over i < n of a[i] * b[i], a in fp16
static inline float dot_f16_f32(const at::Half* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i))),
                          _mm256_loadu_ps(b + i), acc);
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  float s = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
  for (; i < n; ++i) s += half_to_float(a[i]) * b[i];
  return s;
}

template <int NB, int MB>
static void block_q4_x15(const Args& a, int64_t n0, int64_t m0) {
  const int64_t G = a.K / 32;
  vf acc[NB][MB] = {};
  for (int64_t g = 0; g < G; g += QG) {
    for (int i = 0; i < NB; ++i) {
      const uint8_t* row = a.w + row_of(a, n0, i) * a.row_bytes + 16 * g;
      if (g % 4 == 0) prefetch(row + a.pf_bytes);
      const vq wq = unpack_q4(row);
      const vf ws = q4_scales(a.qscale + row_of(a, n0, i) * G + g);
      for (int j = 0; j < MB; ++j) {
        const int64_t m = m0 + j;
        const vf xd = load<vf>(a.x15_scale + (m * (G / QG) + g / QG) * W);
        acc[i][j] += dot_q4_x15(wq, a.x15_hi + m * a.K + g * 32, a.x15_lo + m * a.K + g * 32) * (ws * xd);
      }
    }
  }
  for (int i = 0; i < NB; ++i) {
    const int64_t n = row_of(a, n0, i);
    const float b = a.bias ? a.bias[n] : 0.f;
    for (int j = 0; j < MB; ++j)  // + each group's minimum times the sum of its activations
      a.y[(m0 + j) * a.N + n] = hsum(acc[i][j]) + dot_f16_f32(a.qmin + n * G, a.xsum + (m0 + j) * G, G) + b;
  }
}

// each group of 32 of x's rows as q * scale, q = 256 hi + lo with |q| <= 32639 = 127 * 257 (so both
// digits fit int8; rounded to nearest), at the positions unpack_q4's lanes want; its scale spread the
// same way; and the sum of its float values
static void round_groups_to_x15(const float* x, int64_t M, int64_t K, int8_t* hi, int8_t* lo, float* scale,
                                float* sum) {
  const int64_t G = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float* r = x + m * K + g * 32;
      const float mx = max_abs(r, 32), d = mx / 32639.f, inv = mx > 0.f ? 32639.f / mx : 0.f;
      float s = 0.f;
      for (int t = 0; t < 32; ++t) {
        s += r[t];
        split_digits(round_to(r[t], inv, 32639), hi[m * K + x15_pos(g, t)], lo[m * K + x15_pos(g, t)]);
      }
      sum[m * G + g] = s;
      float* lanes = scale + (m * (G / QG) + g / QG) * W;
      for (int l = 0; l < W; ++l)
        if (x15_lane_group(l) == g % QG) lanes[l] = d;
    }
  }
}
#endif

template <int KIND, int NB>
static void rows_block(const Args& a, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) block<KIND, NB, 4>(a, n0, m);
  for (; m < a.M; ++m) block<KIND, NB, 1>(a, n0, m);
}

template <int KIND>
static void run(Args a) {
  constexpr int NB = 4;
  // Few rows of x (decode): a block's NB rows come from NB far-apart quarters of the matrix, so each
  // thread reads NB purely sequential streams, which the hardware prefetchers follow; adjacent rows
  // read side by side jump 4 rows of addresses at each step and streamed at half the rate. Many rows
  // of x: adjacent rows, whose weights are reused from L1 across all of x.
  const bool streams = a.M < 4;
  const int64_t nblocks = streams ? a.N / NB : (a.N + NB - 1) / NB;
  a.rs = streams ? nblocks : 1;
  a.pf_bytes = PF * (streams ? 1 : NB) * a.row_bytes;
  // at least ~64 KB of weights per task, so small matrices do not pay for waking threads
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, NB * a.row_bytes));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = streams ? b : b * NB;
      if (n0 + (NB - 1) * a.rs < a.N) {
        rows_block<KIND, NB>(a, n0);
      } else {
        for (int64_t n = n0; n < a.N; ++n) rows_block<KIND, 1>(a, n);
      }
    }
  });
  if (streams)  // the N % NB rows past the last quarter
    for (int64_t n = NB * nblocks; n < a.N; ++n) rows_block<KIND, 1>(a, n);
}

// Many rows of x on AMX (Sapphire Rapids and later): fp16, bf16 and int4 weights as bf16 tile products,
// 16 x 16 x 32 multiply-adds per instruction where the float path does 16. The tiles compute
// y^T = W x^T: A = 16 weight rows x 32 columns (bf16 weights straight from the matrix; fp16 weights
// split exactly into two bf16 parts, w = w_hi + w_lo, in a scratch block; int4 groups dequantized to
// fp32 and split the same way), B = the same 32 columns of
// 16 rows of x as pairs (AMX's layout), packed once per call with x split as x_hi + x_lo: 16
// significant bits, as the int8 path rounds them. w_lo x_lo (< 2^-16 of a product) is left out; the
// products are exact in fp32 and accumulate in fp32 tiles. Two blocks of 16 weight rows times two
// blocks of 16 rows of x use all 8 tiles: A0 A1 B0 B1 and the four sums.
constexpr int64_t AMX_MIN_M = 16;  // below, the float path (see wmm)

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

// Linux gives a process the 8 KB tile state only when asked, once; NANOSEEK_AMX=0 keeps the float path
static bool amx_enabled() {
  static const bool ok = !(std::getenv("NANOSEEK_AMX") && std::string(std::getenv("NANOSEEK_AMX")) == "0") &&
                         syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// the offsets of a 16 x 16 tile's column (in 4-byte elements), to gather it as one row of y
static inline __m512i tile_column() {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(16));
}

static void configure_tiles() {  // per thread: every tile 16 rows x 64 bytes
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
  _tile_loadconfig(&c);
}

// 32 floats as bf16 (round to nearest even) and the remainder, itself rounded to bf16: hi and lo,
// 16 pairs each (hi + lo is within 2^-16 of x; exact for fp16 values)
static inline void split_bf16(__m512 a, __m512 b, __m512i& hi, __m512i& lo) {
  hi = bit_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // lanes 0-15 from a, 16-31 from b
  const __m512 ha = bit_cast<__m512>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)), 16));
  const __m512 hb = bit_cast<__m512>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1)), 16));
  lo = bit_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha)));
}

// rows 16 mb.. of x [M, K], columns k..k+31 -> hi, lo [Mp / 16][K / 2][16] pairs of bf16 (AMX's B
// layout; rows past M as zeros): 16 rows split, then transposed in registers (5x faster than scatters)
static void pack_x_amx(const float* x, int64_t M, int64_t K, int64_t mb, int64_t k, uint32_t* hi, uint32_t* lo) {
  __m512i h[16], l[16];
  for (int j = 0; j < 16; ++j) {
    const int64_t m = 16 * mb + j;
    if (m < M) split_bf16(_mm512_loadu_ps(x + m * K + k), _mm512_loadu_ps(x + m * K + k + 16), h[j], l[j]);
    else h[j] = l[j] = _mm512_setzero_si512();
  }
  transpose16(h), transpose16(l);
  const int64_t at = mb * (K / 2) * 16 + (k / 2) * 16;
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(hi + at + 16 * i, h[i]), _mm512_storeu_si512(lo + at + 16 * i, l[i]);
}

// 32 weight rows from n0, columns k..k+31, of an fp16 matrix -> w_hi, w_lo [32][32] bf16
static inline void split_weights_f16(const Args& a, int64_t n0, int64_t k, uint32_t* whi, uint32_t* wlo) {
  for (int i = 0; i < 32; ++i) {
    const uint8_t* p = a.w + (n0 + i) * a.row_bytes + 2 * k;
    _mm_prefetch(reinterpret_cast<const char*>(p + 32 * a.row_bytes), _MM_HINT_T1);  // the next block's
    __m512i h, l;
    split_bf16(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
               _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))), h, l);
    _mm512_store_si512(whi + 16 * i, h), _mm512_store_si512(wlo + 16 * i, l);
  }
}

// 32 weight rows from n0, columns k..k+31 (one group) of an int4 matrix -> w = scale code + minimum
// in fp32, split as w_hi + w_lo [32][32] bf16
static inline void split_weights_q4(const Args& a, int64_t n0, int64_t k, uint32_t* whi, uint32_t* wlo) {
  const int64_t G = a.K / 32, g = k / 32;
  for (int i = 0; i < 32; ++i) {
    const int64_t n = n0 + i;
    const uint8_t* p = a.w + n * a.row_bytes + 16 * g;
    _mm_prefetch(reinterpret_cast<const char*>(p + 32 * a.row_bytes), _MM_HINT_T1);  // the next block's
    vf lo, hi;
    decode_q4(p, 0, lo, hi);
    const float sc = half_to_float(a.qscale[n * G + g]), mn = half_to_float(a.qmin[n * G + g]);
    __m512i h, l;
    split_bf16(bit_cast<__m512>(lo * sc + mn), bit_cast<__m512>(hi * sc + mn), h, l);
    _mm512_store_si512(whi + 16 * i, h), _mm512_store_si512(wlo + 16 * i, l);
  }
}

// y rows m0..m0+31 (two B blocks; NMB = 1: m0..m0+15), weight rows n0..n0+31
template <int KIND, int NMB>
static void block_amx(const Args& a, const uint32_t* xhi, const uint32_t* xlo, int64_t n0, int64_t mb) {
  alignas(64) uint32_t whi[32 * 16], wlo[32 * 16];
  alignas(64) float c[16 * 16];
  const int64_t xb = (a.K / 2) * 16;  // one B block of packed x (uint32 pairs)
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t k = 0; k < a.K; k += 32) {
    const uint32_t* bh = xhi + mb * xb + (k / 2) * 16;
    const uint32_t* bl = xlo + mb * xb + (k / 2) * 16;
    if constexpr (KIND == F16 || KIND == I4) {
      if constexpr (KIND == F16) split_weights_f16(a, n0, k, whi, wlo);
      else split_weights_q4(a, n0, k, whi, wlo);
      _tile_loadd(0, whi, 64);
      _tile_loadd(1, whi + 16 * 16, 64);
    } else {
      const uint8_t* p = a.w + n0 * a.row_bytes + 2 * k;
      for (int i = 0; i < 32; ++i)  // the next block's; into L2 (T0 evicted this block from L1: 10 -> 14 GB/s)
        _mm_prefetch(reinterpret_cast<const char*>(p + (32 + i) * a.row_bytes), _MM_HINT_T1);
      _tile_loadd(0, p, a.row_bytes);
      _tile_loadd(1, p + 16 * a.row_bytes, a.row_bytes);
    }
    // w_hi x_hi, w_hi x_lo (and w_lo x_hi for fp16, int4): sums 4, 5 = A0, A1 x B0; 6, 7 = A0, A1 x B1
    for (int part = 0; part < (KIND == BF16 ? 2 : 3); ++part) {
      const uint32_t* b = part == 1 ? bl : bh;
      if (part == 2) {
        _tile_loadd(0, wlo, 64);
        _tile_loadd(1, wlo + 16 * 16, 64);
      }
      _tile_loadd(2, b, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 1, 2);
      if constexpr (NMB == 2) {
        _tile_loadd(3, b + xb, 64);
        _tile_dpbf16ps(6, 0, 3);
        _tile_dpbf16ps(7, 1, 3);
      }
    }
  }
  // the sum tile [16 weight rows][16 rows of x] into y, a gathered column per row of y (scalar
  // stores of the transpose ran at a third of the speed, 2026-12-06)
  const __m512i column = tile_column();
  auto store = [&](int64_t nb, int64_t m0) {
    const __m512 bias = a.bias ? _mm512_loadu_ps(a.bias + nb) : _mm512_setzero_ps();
    for (int j = 0; j < 16 && m0 + j < a.M; ++j)
      _mm512_storeu_ps(a.y + (m0 + j) * a.N + nb, _mm512_add_ps(_mm512_i32gather_ps(column, c + j, 4), bias));
  };
  _tile_stored(4, c, 64);
  store(n0, 16 * mb);
  _tile_stored(5, c, 64);
  store(n0 + 16, 16 * mb);
  if constexpr (NMB == 2) {
    _tile_stored(6, c, 64);
    store(n0, 16 * mb + 16);
    _tile_stored(7, c, 64);
    store(n0 + 16, 16 * mb + 16);
  }
}

// x packed for the tiles: a buffer kept per calling thread up to 16 MB (a fresh 200 KB vector per
// decode call cost ~50 us in page faults), a fresh one above (a long prefill's would stay pinned)
struct PackedX {
  std::vector<uint32_t> own;
  uint32_t* p;
  explicit PackedX(size_t n) {
    static thread_local std::vector<uint32_t> kept;
    if (n > (size_t{4} << 20)) {
      own.resize(n), p = own.data();
    } else {
      if (kept.size() < n) kept.resize(n);
      p = kept.data();
    }
  }
};

template <int KIND>
static void run_amx(Args a) {
  const int64_t Mp = (a.M + 15) / 16 * 16, nblocks = a.N / 32;
  PackedX xp(Mp * a.K);  // hi then lo, K / 2 pairs per row each
  uint32_t *hi = xp.p, *lo = xp.p + Mp * a.K / 2;
  const int64_t MC = 16;  // blocks of 16 rows of x per pass over a thread's weights (prefill: x stays in L2)
  // one parallel region: the threads pack x, wait for each other (omp for's barrier), then split the
  // blocks of 32 weight rows
#pragma omp parallel num_threads(at::in_parallel_region() ? 1 : at::get_num_threads())
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < Mp / 16 * (a.K / 32); ++t) pack_x_amx(a.x, a.M, a.K, t / (a.K / 32), 32 * (t % (a.K / 32)), hi, lo);
    configure_tiles();
    for (int64_t mc = 0; mc < Mp / 16; mc += MC) {
#pragma omp for schedule(static) nowait
      for (int64_t b = 0; b < nblocks; ++b)
        for (int64_t mb = mc; mb < std::min(mc + MC, Mp / 16); mb += 2) {
          if (mb + 2 <= Mp / 16) block_amx<KIND, 2>(a, hi, lo, 32 * b, mb);
          else block_amx<KIND, 1>(a, hi, lo, 32 * b, mb);
        }
    }
    _tile_release();
  }
  a.rs = 1, a.pf_bytes = 0;
  for (int64_t n = 32 * nblocks; n < a.N; ++n) rows_block<KIND, 1>(a, n);  // the N % 32 rows past the blocks
}

// int8 weights on AMX: x rounded to 16 bits and split into two int8 digits exactly as on the VNNI path
// (q = 256 h + l, round_rows_to_digits), tdpbssd multiplies 16 weight rows x 64 columns (straight from
// the matrix) by the same 64 columns of 16 rows of digits (in fours: AMX's layout), and the exact
// integer sums 256 sum(w h) + sum(w l) = sum(w q) make y the same as the one-row path's.
#if defined(__AMX_INT8__) && HAVE_I8_VNNI
#define HAVE_AMX_I8 1
// rows 16 mb.. of digits d [M, K], columns k..k+63 -> out [Mp / 16][K / 4][16] fours of int8 (rows past M zero)
static void pack_digits_amx(const int8_t* d, int64_t M, int64_t K, int64_t mb, int64_t k, uint32_t* out) {
  __m512i r[16];
  for (int j = 0; j < 16; ++j)
    r[j] = 16 * mb + j < M ? _mm512_loadu_si512(d + (16 * mb + j) * K + k) : _mm512_setzero_si512();
  transpose16(r);
  const int64_t at = mb * (K / 4) * 16 + (k / 4) * 16;
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + at + 16 * i, r[i]);
}

// y rows 16 mb..16 mb + 15, weight rows n0..n0 + 31: sums 4, 5 = rows n0.., n0 + 16.. times the high
// digits; 6, 7 = times the low digits
static void block_amx_i8(const Args& a, const uint32_t* xh, const uint32_t* xl, int64_t n0, int64_t mb) {
  alignas(64) int32_t c[4][256];
  const int64_t xb = (a.K / 4) * 16;  // one block of packed digits (fours)
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t k = 0; k < a.K; k += 64) {
    const uint8_t* p = a.w + n0 * a.row_bytes + k;
    for (int i = 0; i < 32; ++i)  // the next block's, into L2
      _mm_prefetch(reinterpret_cast<const char*>(p + (32 + i) * a.row_bytes), _MM_HINT_T1);
    _tile_loadd(0, p, a.row_bytes);
    _tile_loadd(1, p + 16 * a.row_bytes, a.row_bytes);
    _tile_loadd(2, xh + mb * xb + (k / 4) * 16, 64);
    _tile_loadd(3, xl + mb * xb + (k / 4) * 16, 64);
    _tile_dpbssd(4, 0, 2);
    _tile_dpbssd(5, 1, 2);
    _tile_dpbssd(6, 0, 3);
    _tile_dpbssd(7, 1, 3);
  }
  _tile_stored(4, c[0], 64);
  _tile_stored(5, c[1], 64);
  _tile_stored(6, c[2], 64);
  _tile_stored(7, c[3], 64);
  // y row m, weight rows nb..nb+15: a gathered column of each sum tile, the exact dot in int64, then
  // block_i8_vnni's last line for 16 rows at once
  const __m512i column = tile_column();
  auto dot8 = [](__m256i h, __m256i l) {
    return _mm512_cvtepi64_ps(_mm512_add_epi64(_mm512_slli_epi64(_mm512_cvtepi32_epi64(h), 8), _mm512_cvtepi32_epi64(l)));
  };
  for (int half = 0; half < 2; ++half) {
    const int64_t nb = n0 + 16 * half;
    const __m512 sc = _mm512_loadu_ps(a.scale + nb), bias = a.bias ? _mm512_loadu_ps(a.bias + nb) : _mm512_setzero_ps();
    for (int j = 0; j < 16 && 16 * mb + j < a.M; ++j) {
      const int64_t m = 16 * mb + j;
      const __m512i h = _mm512_i32gather_epi32(column, c[half] + j, 4), l = _mm512_i32gather_epi32(column, c[2 + half] + j, 4);
      const __m512 dot = _mm512_insertf32x8(_mm512_castps256_ps512(dot8(_mm512_castsi512_si256(h), _mm512_castsi512_si256(l))),
                                            dot8(_mm512_extracti64x4_epi64(h, 1), _mm512_extracti64x4_epi64(l, 1)), 1);
      _mm512_storeu_ps(a.y + m * a.N + nb, _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(dot, _mm512_set1_ps(a.xq_scale[m])), sc), bias));
    }
  }
}

// dh, dl [M, K], xs, sums [M]: room for x's digits, rounded here on all threads (round_rows_to_digits)
static void run_amx_i8(Args a, int8_t* dh, int8_t* dl, float* xs, int64_t* sums) {
  a.x16_hi = dh, a.x16_lo = dl, a.x16_sum = sums, a.xq_scale = xs;  // for the tail rows' VNNI path
  const int64_t Mp = (a.M + 15) / 16 * 16, nblocks = a.N / 32;
  PackedX xp(Mp * a.K / 2);  // the digits in AMX's layout, high then low
  uint32_t *hi = xp.p, *lo = xp.p + Mp * a.K / 4;
#pragma omp parallel num_threads(at::in_parallel_region() ? 1 : at::get_num_threads())
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < a.M; ++m)
      round_rows_to_digits(a.x + m * a.K, 1, a.K, dh + m * a.K, dl + m * a.K, xs + m, sums + m);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < Mp / 16 * (a.K / 64); ++t) {
      const int64_t mb = t / (a.K / 64), k = 64 * (t % (a.K / 64));
      pack_digits_amx(a.x16_hi, a.M, a.K, mb, k, hi), pack_digits_amx(a.x16_lo, a.M, a.K, mb, k, lo);
    }
    configure_tiles();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b)
      for (int64_t mb = 0; mb < Mp / 16; ++mb) block_amx_i8(a, hi, lo, 32 * b, mb);
    _tile_release();
  }
  a.rs = 1, a.pf_bytes = 0;
  for (int64_t n = 32 * nblocks; n < a.N; ++n) rows_block<I8, 1>(a, n);  // the N % 32 rows past the blocks (VNNI)
}
#else
#define HAVE_AMX_I8 0
#endif
#else
#define HAVE_AMX 0
#define HAVE_AMX_I8 0
static bool amx_enabled() { return false; }
#endif

// x [M, K] fp32; w: F16/BF16 [N, K] 16-bit, I8 [N, K] int8, I4 [N, K/2] uint8, F32 [N, K];
// scales: I8 fp32 [N]; I4 fp16 [2, N, K/32] (scale, minimum); else an empty tensor
at::Tensor wmm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales,
               const c10::optional<at::Tensor>& bias, int64_t kind) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, "wmm: x must be fp32 on CPU");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % (kind == I4 ? 32 : W) == 0, "wmm: K must be a multiple of the vector width");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2, "wmm: weight must be contiguous 2-d");
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor bias_c, xsum;
  Args a{};
  a.x = x.data_ptr<float>();
  a.w = static_cast<const uint8_t*>(w.data_ptr());
  a.row_bytes = w.size(1) * w.element_size();
  a.M = M, a.N = N, a.K = K;
  a.y = y.data_ptr<float>();
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kFloat).contiguous();
    a.bias = bias_c.data_ptr<float>();
  }
  [[maybe_unused]] const bool amx_rows = M >= AMX_MIN_M && K % 32 == 0 && amx_enabled();  // on AMX tiles
#if HAVE_AMX
  if (amx_rows && (kind == F16 || kind == BF16)) {
    kind == F16 ? run_amx<F16>(a) : run_amx<BF16>(a);
    return y;
  }
#endif
  switch (kind) {
    case F16: run<F16>(a); break;
    case BF16: run<BF16>(a); break;
    case F32: run<F32>(a); break;
    case I8: {
      a.scale = scales.data_ptr<float>();
#if HAVE_I16_DOT
      std::vector<int16_t> xq;
      std::vector<float> xs;
#if HAVE_I8_VNNI
      std::vector<int8_t> digits;
      std::vector<int64_t> sums;
      const bool amx_i8 = HAVE_AMX_I8 && amx_rows;
      // a few rows (decode) on VNNI, 16 and more on AMX tiles; at 32 rows without AMX the int16 path was as fast
      if (K <= I16_DOT_MAX_K && K % 64 == 0 && (M < 4 || amx_i8)) {
        digits.resize(2 * M * K);
        xs.resize(M);
        sums.resize(M);
#if HAVE_AMX_I8
        if (amx_i8) {
          run_amx_i8(a, digits.data(), digits.data() + M * K, xs.data(), sums.data());
          break;
        }
#endif
        round_rows_to_digits(a.x, M, K, digits.data(), digits.data() + M * K, xs.data(), sums.data());
        a.x16_hi = digits.data(), a.x16_lo = digits.data() + M * K, a.x16_sum = sums.data(), a.xq_scale = xs.data();
        run<I8>(a);
        break;
      }
#endif
      if (K <= I16_DOT_MAX_K && K % KSTEP == 0) {  // here, not as ATen ops: ~8 fewer op calls per matrix
        xq.resize(M * K);
        xs.resize(M);
        round_rows_to_i16(a.x, M, K, xq.data(), xs.data());
        a.xq = xq.data();
        a.xq_scale = xs.data();
      }
#endif
      run<I8>(a);
      break;
    }
    case I4: {
      a.qscale = scales.data_ptr<at::Half>();
      a.qmin = a.qscale + N * (K / 32);
#if HAVE_AMX
      if (amx_rows) {  // dequantized to bf16 parts on the fly, as fp16 weights
        if (N % 32) {  // the N % 32 rows past the tiles' blocks take the float path, which needs these
          xsum = x.view({M, K / 32, 32}).sum(-1).contiguous();
          a.xsum = xsum.data_ptr<float>();
        }
        run_amx<I4>(a);
        break;
      }
#endif
#if HAVE_Q4_DOT
      std::vector<int8_t> xq;
      std::vector<float> xd, xs;
      if (K % (32 * QG) == 0) {
        xq.resize(2 * M * K);
        xd.resize(M * (K / 32 / QG) * W);
        xs.resize(M * (K / 32));
        round_groups_to_x15(a.x, M, K, xq.data(), xq.data() + M * K, xd.data(), xs.data());
        a.x15_hi = xq.data(), a.x15_lo = xq.data() + M * K, a.x15_scale = xd.data(), a.xsum = xs.data();
        run<I4>(a);
        break;
      }
#endif
      xsum = x.view({M, K / 32, 32}).sum(-1).contiguous();
      a.xsum = xsum.data_ptr<float>();
      run<I4>(a);
      break;
    }
    default: TORCH_CHECK(false, "wmm: unknown kind ", kind);
  }
  return y;
}

// Decode attention, one query per sequence: q [B, 1, H, D]; k [B, S, G, D], v [B, S, G, Dv] (any
// strides but the last, e.g. rows of the KV cache); mask [B, 1, 1, S] bool, true = attend; GQA:
// query head h reads kv head h / (H / G). One task per (row, kv head) serves the H / G query heads
// that share its keys and values; they fit in L1/L2 at decode lengths, so each head makes its own
// three passes (scores, softmax, weighted sum of V) with its query and output in registers. PyTorch's
// flash kernel spent ~25 us per layer here on tiny blocks (SmolLM2, S = 150). Masked keys get weight
// exactly 0 (no infinities: the library is built with -ffast-math).

static inline int64_t round_up_to_w(int64_t S) { return (S + W - 1) / W * W; }

// softmax over the S scores in p where m (1 = attend, 0 = masked) allows; p and m hold S rounded up to
// W entries (m 0 past S), so every pass runs whole vectors. Returns the log-sum-exp of the allowed scores.
static inline float softmax_masked(float* p, const float* m, int64_t S) {
  const int64_t Sp = round_up_to_w(S);
  std::fill(p + S, p + Sp, 0.f);
  vf mx = vf{} - 3.4e38f;
  for (int64_t s = 0; s < Sp; s += W) {
    const vf x = load<vf>(p + s);
    const vf y = load<vf>(m + s) > 0.f ? x : mx;
    mx = mx > y ? mx : y;
  }
  float M = mx[0];
  for (int l = 1; l < W; ++l) M = std::max(M, mx[l]);
  vf sum{};
  for (int64_t s = 0; s < Sp; s += W) {
    vf d = load<vf>(p + s) - M;
    d = d > 0.f ? vf{} : d;
    const vf e = exp_nonpositive(d) * load<vf>(m + s);
    std::memcpy(p + s, &e, sizeof(vf));
    sum += e;
  }
  const float total = hsum(sum), inv = total > 0.f ? 1.f / total : 0.f;
  for (int64_t s = 0; s < Sp; s += W) {
    const vf e = load<vf>(p + s) * inv;
    std::memcpy(p + s, &e, sizeof(vf));
  }
  return M + std::log(std::max(total, 1e-30f));
}

// W partial-sum vectors -> one vector whose lane j is the total of d[j]: each level adds the two
// halves of two vectors' lanes (log2 W levels, W - 1 adds), where a horizontal sum per vector costs
// about as much as the dot product it ends (4 vectors per key at head size 64)
#if defined(__AVX512F__)
#define HAVE_TRANSPOSED_SUM 1
static inline vf transposed_sum(const vf* d) {
  vf h[8], g[4], x[2];
  for (int i = 0; i < 8; ++i)
    h[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(d[2 * i], d[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    g[i] = __builtin_shufflevector(h[2 * i], h[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(h[2 * i], h[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    x[i] = __builtin_shufflevector(g[2 * i], g[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(g[2 * i], g[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(x[0], x[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(x[0], x[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#elif defined(__AVX__)
#define HAVE_TRANSPOSED_SUM 1
static inline vf transposed_sum(const vf* d) {
  vf h[4], g[2];
  for (int i = 0; i < 4; ++i)
    h[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(d[2 * i], d[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    g[i] = __builtin_shufflevector(h[2 * i], h[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(h[2 * i], h[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(g[0], g[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(g[0], g[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
#else
#define HAVE_TRANSPOSED_SUM 0
#endif

// C vectors per head (D = Dv = C * W): query and output accumulators stay in registers
// a cached key or value vector as fp32: the cache holds fp32 or fp16 (half the bytes to read per step)
template <typename T>
static inline vf load_kv(const T* p) {
  if constexpr (std::is_same_v<T, at::Half>) return f16_to_f32(reinterpret_cast<const uint8_t*>(p));
  else return load<vf>(p);
}

// The weighted sum of V for RN heads at once: each value vector is read (and converted) once for all
// of them, RN * C accumulators in registers
template <int C, int RN, typename T>
static void weigh_values(const float* p, int64_t Sp, const T* v, int64_t S, int64_t vs, float* out) {
  vf acc[RN][C] = {};
  for (int64_t s = 0; s < S; ++s) {
    vf vv[C];
    const T* vr = v + s * vs;
    for (int c = 0; c < C; ++c) vv[c] = load_kv(vr + c * W);
    for (int r = 0; r < RN; ++r) {
      const vf w = vf{} + p[r * Sp + s];
      for (int c = 0; c < C; ++c) acc[r][c] += w * vv[c];
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

// The R query heads that share one kv head (D = Dv = C * W): scores block by block of W keys for every
// head (the block stays in L1 across heads), softmax per head, then values for up to 16 / C heads at a
// time. Each head making its own passes read the keys and values R times: 3x at SmolLM2's GQA, 8-12 ns
// per head and key at batch 32.
template <int C, typename T>
static void attend_heads(const float* q, const T* k, const T* v, const float* m, float* out, int64_t S, int64_t R,
                         int64_t ks, int64_t vs, float scale, float* p) {
  const int64_t Sp = round_up_to_w(S);
  int64_t s = 0;
#if HAVE_TRANSPOSED_SUM
  for (; s + W <= S; s += W)  // W keys at a time: their W dot products in one vector
    for (int64_t r = 0; r < R; ++r) {
      vf qv[C], d[W];
      for (int c = 0; c < C; ++c) qv[c] = load<vf>(q + r * C * W + c * W);
      for (int j = 0; j < W; ++j) {
        const T* kr = k + (s + j) * ks;
        d[j] = qv[0] * load_kv(kr);
        for (int c = 1; c < C; ++c) d[j] += qv[c] * load_kv(kr + c * W);
      }
      const vf sc = transposed_sum(d) * scale;
      std::memcpy(p + r * Sp + s, &sc, sizeof(vf));
    }
#endif
  for (; s < S; ++s)
    for (int64_t r = 0; r < R; ++r) {
      const T* kr = k + s * ks;
      vf d = load<vf>(q + r * C * W) * load_kv(kr);
      for (int c = 1; c < C; ++c) d += load<vf>(q + r * C * W + c * W) * load_kv(kr + c * W);
      p[r * Sp + s] = hsum(d) * scale;
    }
  for (int64_t r = 0; r < R; ++r) softmax_masked(p + r * Sp, m, S);
  constexpr int RN = std::clamp(16 / C, 1, 4);
  int64_t r = 0;
  for (; r + RN <= R; r += RN) weigh_values<C, RN>(p + r * Sp, Sp, v, S, vs, out + r * C * W);
  for (; r < R; ++r) weigh_values<C, 1>(p + r * Sp, Sp, v, S, vs, out + r * C * W);
}

template <typename T>
static void attend_head_any(const float* q, const T* k, const T* v, const float* m, float* out, int64_t S,
                            int64_t D, int64_t Dv, int64_t ks, int64_t vs, float scale, float* p) {
  for (int64_t s = 0; s < S; ++s) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * static_cast<float>(k[s * ks + d]);
    p[s] = dot * scale;
  }
  softmax_masked(p, m, S);
  std::fill(out, out + Dv, 0.f);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t d = 0; d < Dv; ++d) out[d] += p[s] * static_cast<float>(v[s * vs + d]);
}

template <typename T>
static void attend_one(const float* q, const T* k, const T* v, const bool* mask, float* out,
                       int64_t S, int64_t R, int64_t D, int64_t Dv, int64_t ks, int64_t vs, int64_t ms,
                       float scale, float* p) {
  const int64_t Sp = round_up_to_w(S);
  float* m = p + R * Sp;  // the mask as 1 / 0 multipliers, 0 past S (p: R heads' scores, then this)
  for (int64_t s = 0; s < Sp; ++s) m[s] = s < S && mask[s * ms] ? 1.f : 0.f;
  if (D == Dv && D == 4 * W) return attend_heads<4>(q, k, v, m, out, S, R, ks, vs, scale, p);
  if (D == Dv && D == 2 * W) return attend_heads<2>(q, k, v, m, out, S, R, ks, vs, scale, p);
  if (D == Dv && D == 8 * W) return attend_heads<8>(q, k, v, m, out, S, R, ks, vs, scale, p);
  if (D == Dv && D == W) return attend_heads<1>(q, k, v, m, out, S, R, ks, vs, scale, p);
  for (int64_t r = 0; r < R; ++r) attend_head_any(q + r * D, k, v, m, out + r * Dv, S, D, Dv, ks, vs, scale, p);
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& mask, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4,
              "decode_attention: q [B, 1, H, D], k/v [B, S, G, D], mask [B, 1, 1, S]");
  TORCH_CHECK(q_in.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && q_in.scalar_type() == at::kFloat &&
              (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf) && v.scalar_type() == k.scalar_type(),
              "decode_attention: fp32 q, fp32 or fp16 k and v, on CPU");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "decode_attention: the mask must be bool");
  const at::Tensor q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3), S = k.size(1), G = k.size(2), Dv = v.size(3);
  TORCH_CHECK(q.size(1) == 1, "decode_attention: one query per row");
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == S && v.size(2) == G && k.size(3) == D &&
              H % G == 0 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k/v shapes or strides");
  TORCH_CHECK(mask.size(0) == B && mask.size(3) == S && mask.size(1) == 1 && mask.size(2) == 1,
              "decode_attention: mask must be [B, 1, 1, S]");
  const int64_t R = H / G;
  at::Tensor out = at::empty({B, 1, H, Dv}, q.options());
  const float* qp = q.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  auto run = [&](auto* kp, auto* vp) {
    // ~256 KB of keys and values per task before threads share the work: waking them costs more
    const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, S * (D + Dv) * k.element_size()));
    at::parallel_for(0, B * G, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> p((R + 1) * round_up_to_w(S));  // the heads' scores, then the mask's multipliers
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / G, g = i % G;
        attend_one(qp + (b * H + g * R) * D, kp + b * k.stride(0) + g * k.stride(2),
                   vp + b * v.stride(0) + g * v.stride(2), mp + b * mask.stride(0), op + (b * H + g * R) * Dv,
                   S, R, D, Dv, k.stride(1), v.stride(1), mask.stride(3), static_cast<float>(scale), p.data());
      }
    });
  };
  if (k.scalar_type() == at::kHalf) run(k.data_ptr<at::Half>(), v.data_ptr<at::Half>());
  else run(k.data_ptr<float>(), v.data_ptr<float>());
  return out;
}

// Attention for training on short windows (kernels.py: attention), forward and backward. q [B, H, T, D],
// k [B, G, S, D], v [B, G, S, Dv], contiguous (GQA: query head h reads kv head h / (H / G)); mask
// [B, T, S] bool (true = attend) or empty for causal (key j <= query i + S - T). Each row visits only
// its allowed keys, found as runs in its mask row: a packed window's document mask leaves a few dozen of
// 128 (one run), GRPO's packed groups a prompt and one completion of eight (two runs), where SDPA's flash
// kernel scores every block up to the diagonal. A row's scores are kept packed, run after run. One task
// per (row, kv head) holds its keys and values transposed ([D, S]: W keys' scores per broadcast FMA, no
// horizontal sums) and its heads' dK, dV, all in L2 at these lengths. The backward recomputes the
// probabilities from the forward's log-sum-exp: dS = P (dP - rowsum(dO o)) scale, dP = dO V^T.
struct AttnArgs {
  const float *q, *k, *v, *o, *dout, *lse;
  const bool* mask;  // null: causal
  float *out, *lse_out, *dq, *dk, *dv;
  int64_t B, H, G, T, S, D, Dv;
  int64_t Sp;                   // transposed rows' length: S rounded up to W, plus W (a span's last vector)
  float scale;
  std::vector<int64_t> run_off;  // [B * T + 1]: query r's runs are runs[2 run_off[r] .. 2 run_off[r + 1])
  std::vector<int32_t> runs;     // [lo, hi) pairs of allowed keys
};

// the runs of allowed keys in a mask row, written as [lo, hi) pairs to out (if given); returns how many
static int64_t mask_runs(const bool* m, int64_t S, int32_t* out) {
  // 8 entries at a time where they are all false or all true (the long stretches of a document or a
  // causal mask), one at a time across a run's edges
  constexpr uint64_t none = 0, all = 0x0101010101010101ull;
  const auto word = [&](int64_t j) { return load<uint64_t>(m + j); };
  int64_t n = 0;
  for (int64_t j = 0; j < S;) {
    while (j + 8 <= S && word(j) == none) j += 8;
    while (j < S && !m[j]) ++j;
    const int64_t lo = j;
    while (j + 8 <= S && word(j) == all) j += 8;
    while (j < S && m[j]) ++j;
    if (j > lo) {
      if (out) out[2 * n] = static_cast<int32_t>(lo), out[2 * n + 1] = static_cast<int32_t>(j);
      ++n;
    }
  }
  return n;
}

// each query's runs, once for all heads (causal: one run, [0, i + S - T])
static void key_runs(AttnArgs& a) {
  const int64_t R = a.B * a.T;
  a.run_off.assign(R + 1, 0);
  if (!a.mask) {
    a.runs.resize(2 * R);
    for (int64_t r = 0; r < R; ++r)
      a.run_off[r + 1] = r + 1, a.runs[2 * r] = 0,
      a.runs[2 * r + 1] = static_cast<int32_t>(std::min(a.S, r % a.T + a.S - a.T + 1));
    return;
  }
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) a.run_off[r + 1] = mask_runs(a.mask + r * a.S, a.S, nullptr);
  });
  for (int64_t r = 0; r < R; ++r) a.run_off[r + 1] += a.run_off[r];
  a.runs.resize(2 * a.run_off[R]);
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) mask_runs(a.mask + r * a.S, a.S, a.runs.data() + 2 * a.run_off[r]);
  });
}

// query i of sequence b: its runs [runs, runs + 2 nr) and its allowed keys' count n; m[0, n) = 1, then 0 to
// the next whole vector (the packed scores' weights)
static inline int64_t key_runs_of(const AttnArgs& a, int64_t b, int64_t i, const int32_t*& runs, int64_t& nr,
                                  float* m) {
  const int64_t r = b * a.T + i;
  runs = a.runs.data() + 2 * a.run_off[r], nr = a.run_off[r + 1] - a.run_off[r];
  int64_t n = 0;
  for (int64_t u = 0; u < nr; ++u) n += runs[2 * u + 1] - runs[2 * u];
  std::fill(m, m + n, 1.f);
  std::fill(m + n, m + round_up_to_w(n), 0.f);
  return n;
}

// the part of C vectors that holds D floats: vector c's count
static inline int64_t part(int64_t D, int c) { return std::clamp<int64_t>(D - c * W, 0, W); }

// rows x [S, D] -> xp [S, C vectors], zero-padded (so every per-key update is C whole vectors)
template <int C>
static void pad_rows(const float* x, int64_t S, int64_t D, vf* xp) {
  for (int64_t j = 0; j < S; ++j)
    for (int c = 0; c < C; ++c) xp[j * C + c] = load_n(x + j * D + c * W, part(D, c));
}

// and back: xp [S, C vectors] -> rows x [S, D]
template <int C>
static void unpad_rows(const vf* xp, int64_t S, int64_t D, float* x) {
  for (int64_t j = 0; j < S; ++j)
    for (int c = 0; c < C; ++c)
      if (part(D, c)) store_n(x + j * D + c * W, xp[j * C + c], part(D, c));
}

// rows x [S, D] -> xT [D, Sp] (Sp >= S + W, the tail zero: a span's last vector may read past S); row
// by row of xT, so its writes are contiguous (x's S rows stay in L1)
static void transpose_rows(const float* x, int64_t S, int64_t D, int64_t Sp, float* xT) {
  for (int64_t d = 0; d < D; ++d) {
    float* t = xT + d * Sp;
    for (int64_t j = 0; j < S; ++j) t[j] = x[j * D + d];
    std::fill(t + S, t + Sp, 0.f);
  }
}

// s[0, n) = scale * (x . keys lo .. lo + n), W keys per step from the transposed keys; four partial
// sums over d, so the FMAs do not wait on each other (a row has few keys: this is latency, not width)
static inline void row_dots(const float* x, const float* kT, int64_t Sp, int64_t D, int64_t lo, int64_t n, float scale,
                            float* s) {
  for (int64_t j = 0; j < n; j += W) {
    const float* k = kT + lo + j;
    vf a0{}, a1{}, a2{}, a3{};
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
      a0 += x[d] * load<vf>(k + d * Sp);
      a1 += x[d + 1] * load<vf>(k + (d + 1) * Sp);
      a2 += x[d + 2] * load<vf>(k + (d + 2) * Sp);
      a3 += x[d + 3] * load<vf>(k + (d + 3) * Sp);
    }
    for (; d < D; ++d) a0 += x[d] * load<vf>(k + d * Sp);
    const vf acc = ((a0 + a1) + (a2 + a3)) * scale;
    std::memcpy(s + j, &acc, sizeof(vf));
  }
}

// row_dots over a query's runs, packed one after another into s (a run's last vector spills past it and
// is overwritten by the next run; past the last, the weights m are 0)
static inline void run_dots(const float* x, const float* kT, int64_t Sp, int64_t D, const int32_t* runs, int64_t nr,
                            float scale, float* s) {
  for (int64_t u = 0, off = 0; u < nr; off += runs[2 * u + 1] - runs[2 * u], ++u)
    row_dots(x, kT, Sp, D, runs[2 * u], runs[2 * u + 1] - runs[2 * u], scale, s + off);
}

// one task's buffers: keys / values transposed [D or Dv, Sp]; padded rows [S, C] (keys, values, their
// gradients); a row's scores, their gradients and the mask's weights [Sp]
struct AttnTask {
  std::vector<float> kT, vT, p, dp, m;
  std::vector<vf> kp, vp, dkp, dvp;
  AttnTask(const AttnArgs& a, int C) {
    const int64_t Sp = a.Sp;
    kT.resize(a.D * Sp), vT.resize(a.Dv * Sp), p.resize(Sp), dp.resize(Sp), m.resize(Sp);
    kp.resize(a.S * C), vp.resize(a.S * C), dkp.resize(a.S * C), dvp.resize(a.S * C);
  }
};

template <int C>
static void attention_fwd_task(const AttnArgs& a, int64_t b, int64_t g, AttnTask& w) {
  const int64_t Sp = a.Sp, R = a.H / a.G;
  transpose_rows(a.k + (b * a.G + g) * a.S * a.D, a.S, a.D, Sp, w.kT.data());
  pad_rows<C>(a.v + (b * a.G + g) * a.S * a.Dv, a.S, a.Dv, w.vp.data());
  for (int64_t h = g * R; h < (g + 1) * R; ++h) {
    for (int64_t i = 0; i < a.T; ++i) {
      const int64_t row = (b * a.H + h) * a.T + i;
      const int32_t* runs;
      int64_t nr;
      const int64_t n = key_runs_of(a, b, i, runs, nr, w.m.data());
      vf acc[C] = {};
      a.lse_out[row] = 0.f;  // no key allowed: output 0 (SDPA gives NaN), nothing flows back
      if (n > 0) {
        run_dots(a.q + row * a.D, w.kT.data(), Sp, a.D, runs, nr, a.scale, w.p.data());
        a.lse_out[row] = softmax_masked(w.p.data(), w.m.data(), n);
        const float* p = w.p.data();
        vf acc2[C] = {};  // odd keys: two chains of adds
        for (int64_t u = 0; u < nr; ++u) {
          int64_t j = runs[2 * u];
          for (; j + 2 <= runs[2 * u + 1]; j += 2, p += 2) {
            const vf p0 = vf{} + p[0], p1 = vf{} + p[1];
            for (int c = 0; c < C; ++c) acc[c] += p0 * w.vp[j * C + c], acc2[c] += p1 * w.vp[(j + 1) * C + c];
          }
          if (j < runs[2 * u + 1]) {
            const vf pj = vf{} + *p++;
            for (int c = 0; c < C; ++c) acc[c] += pj * w.vp[j * C + c];
          }
        }
        for (int c = 0; c < C; ++c) acc[c] += acc2[c];
      }
      unpad_rows<C>(acc, 1, a.Dv, a.out + row * a.Dv);
    }
  }
}

template <int C>
static void attention_bwd_task(const AttnArgs& a, int64_t b, int64_t g, AttnTask& w) {
  const int64_t Sp = a.Sp, R = a.H / a.G, kv = b * a.G + g;
  transpose_rows(a.k + kv * a.S * a.D, a.S, a.D, Sp, w.kT.data());
  transpose_rows(a.v + kv * a.S * a.Dv, a.S, a.Dv, Sp, w.vT.data());
  pad_rows<C>(a.k + kv * a.S * a.D, a.S, a.D, w.kp.data());
  std::fill(w.dkp.begin(), w.dkp.end(), vf{});
  std::fill(w.dvp.begin(), w.dvp.end(), vf{});
  for (int64_t h = g * R; h < (g + 1) * R; ++h) {
    for (int64_t i = 0; i < a.T; ++i) {
      const int64_t row = (b * a.H + h) * a.T + i;
      const float *q = a.q + row * a.D, *dout = a.dout + row * a.Dv, *o = a.o + row * a.Dv;
      const int32_t* runs;
      int64_t nr;
      const int64_t n = key_runs_of(a, b, i, runs, nr, w.m.data());
      vf dq[C] = {}, qv[C], dov[C];
      if (n > 0) {
        const int64_t np = round_up_to_w(n);
        float* p = w.p.data();
        float* dp = w.dp.data();
        run_dots(q, w.kT.data(), Sp, a.D, runs, nr, a.scale, p);
        run_dots(dout, w.vT.data(), Sp, a.Dv, runs, nr, 1.f, dp);
        float delta = 0.f;
        for (int64_t d = 0; d < a.Dv; ++d) delta += dout[d] * o[d];
        const float lse = a.lse[row];
        for (int64_t j = 0; j < np; j += W) {  // P from the log-sum-exp, then dS = P (dP - delta) scale
          vf x = load<vf>(p + j) - lse;
          x = x > 0.f ? vf{} : x;
          const vf pj = exp_nonpositive(x) * load<vf>(w.m.data() + j);
          const vf ds = pj * (load<vf>(dp + j) - delta) * a.scale;
          std::memcpy(p + j, &pj, sizeof(vf));
          std::memcpy(dp + j, &ds, sizeof(vf));
        }
        pad_rows<C>(q, 1, a.D, qv), pad_rows<C>(dout, 1, a.Dv, dov);
        for (int64_t u = 0, o = 0; u < nr; ++u)
          for (int64_t j = runs[2 * u]; j < runs[2 * u + 1]; ++j, ++o) {
            const vf pj = vf{} + p[o], ds = vf{} + dp[o];
            for (int c = 0; c < C; ++c) {
              dq[c] += ds * w.kp[j * C + c];
              w.dkp[j * C + c] += ds * qv[c];
              w.dvp[j * C + c] += pj * dov[c];
            }
          }
      }
      unpad_rows<C>(dq, 1, a.D, a.dq + row * a.D);
    }
  }
  unpad_rows<C>(w.dkp.data(), a.S, a.D, a.dk + kv * a.S * a.D);
  unpad_rows<C>(w.dvp.data(), a.S, a.Dv, a.dv + kv * a.S * a.Dv);
}

// C vectors cover the larger of D and Dv: one of a few instantiations (C rounded up to it)
template <typename F>
static void with_vectors(int64_t D, F&& f) {
  const int64_t c = (D + W - 1) / W;
  if (c <= 1) f(std::integral_constant<int, 1>{});
  else if (c <= 2) f(std::integral_constant<int, 2>{});
  else if (c <= 3) f(std::integral_constant<int, 3>{});
  else if (c <= 4) f(std::integral_constant<int, 4>{});
  else if (c <= 8) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 16>{});
}

static AttnArgs attn_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                          double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q [B, H, T, D], k/v [B, G, S, D]");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "attention: contiguous fp32 CPU tensors");
  AttnArgs a{};
  a.B = q.size(0), a.H = q.size(1), a.T = q.size(2), a.D = q.size(3);
  a.G = k.size(1), a.S = k.size(2), a.Dv = v.size(3), a.Sp = round_up_to_w(a.S) + W;
  TORCH_CHECK(std::max(q.size(3), v.size(3)) <= 16 * W, "attention: head size above 16 vectors");
  TORCH_CHECK(k.size(0) == a.B && v.size(0) == a.B && v.size(1) == a.G && v.size(2) == a.S && k.size(3) == a.D &&
              a.H % a.G == 0 && a.S >= a.T, "attention: k/v shapes");
  if (mask.numel()) {
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 3 && mask.size(0) == a.B &&
                mask.size(1) == a.T && mask.size(2) == a.S, "attention: mask must be contiguous bool [B, T, S]");
    a.mask = mask.data_ptr<bool>();
  }
  a.q = q.data_ptr<float>(), a.k = k.data_ptr<float>(), a.v = v.data_ptr<float>();
  a.scale = static_cast<float>(scale);
  key_runs(a);
  return a;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& mask, double scale) {
  AttnArgs a = attn_args(q, k, v, mask, scale);
  at::Tensor out = at::empty({a.B, a.H, a.T, a.Dv}, q.options()), lse = at::empty({a.B, a.H, a.T}, q.options());
  a.out = out.data_ptr<float>(), a.lse_out = lse.data_ptr<float>();
  with_vectors(std::max(a.D, a.Dv), [&](auto C) {
    at::parallel_for(0, a.B * a.G, 1, [&](int64_t t0, int64_t t1) {
      AttnTask w(a, C);
      for (int64_t t = t0; t < t1; ++t) attention_fwd_task<C>(a, t / a.G, t % a.G, w);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const at::Tensor& mask, double scale) {
  AttnArgs a = attn_args(q, k, v, mask, scale);
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && lse.is_contiguous() && dout.sizes() == out.sizes() &&
              out.size(3) == a.Dv, "attention: dout / out / lse");
  const at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  a.o = out.data_ptr<float>(), a.dout = dout.data_ptr<float>(), a.lse = lse.data_ptr<float>();
  a.dq = dq.data_ptr<float>(), a.dk = dk.data_ptr<float>(), a.dv = dv.data_ptr<float>();
  with_vectors(std::max(a.D, a.Dv), [&](auto C) {
    at::parallel_for(0, a.B * a.G, 1, [&](int64_t t0, int64_t t1) {
      AttnTask w(a, C);
      for (int64_t t = t0; t < t1; ++t) attention_bwd_task<C>(a, t / a.G, t % a.G, w);
    });
  });
  return {dq, dk, dv};
}

int64_t vector_width() { return W; }
bool amx() { return amx_enabled(); }  // are 16 rows and more multiplied on AMX tiles (fp16, bf16, int8, int4)?

TORCH_LIBRARY(nanoseek, m) {
  m.def("wmm(Tensor x, Tensor w, Tensor scales, Tensor? bias, int kind) -> Tensor");
  m.def("vector_width() -> int");
  m.def("amx() -> bool");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor mask, float scale) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("wmm", &wmm);
  m.impl("decode_attention", &decode_attention);
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

TORCH_LIBRARY_IMPL(nanoseek, CompositeExplicitAutograd, m) {
  m.impl("vector_width", &vector_width);
  m.impl("amx", &amx);
}
