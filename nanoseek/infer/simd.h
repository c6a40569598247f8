// The SIMD vocabulary nanoseek's C++ kernels share (kernels.cpp, ffn.cpp, norm.cpp): GCC vector types W floats
// wide (the machine's own width: built with -march=native), unaligned loads, bf16 <-> fp32 and a
// vectorised e^x, rows of fp32 or bf16 read and written n <= W at a time.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi32 __attribute__((vector_size(W * 4)));
typedef uint32_t vu32 __attribute__((vector_size(W * 4)));
typedef int8_t vi8 __attribute__((vector_size(W)));
typedef uint8_t vu8 __attribute__((vector_size(W)));
typedef uint16_t vu16 __attribute__((vector_size(W * 2)));
typedef _Float16 vh __attribute__((vector_size(W * 2)));

template <typename V>
static inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename T, typename S>
static inline T bit_cast(const S& s) {
  T t;
  std::memcpy(&t, &s, sizeof(T));
  return t;
}

static inline vf bf16_to_f32(const uint8_t* p) {
#if defined(__AVX512F__)
  __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return bit_cast<vf>(_mm512_slli_epi32(u, 16));
#elif defined(__AVX2__)
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return bit_cast<vf>(_mm256_slli_epi32(u, 16));
#else
  return bit_cast<vf>(__builtin_convertvector(load<vu16>(p), vu32) << 16);
#endif
}

// fp32 -> bf16 with round to nearest even (as torch rounds), W lanes (no NaN care: -ffast-math)
static inline void store_bf16(void* p, vf v) {
  vu32 b = bit_cast<vu32>(v);
  b = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  const vu16 h = __builtin_convertvector(b, vu16);
  std::memcpy(p, &h, sizeof(h));
}

// the sum of v's W lanes (a tree: log2(W) dependent adds, not W)
static inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#else
  for (int w = W / 2; w >= 1; w /= 2) {
    vf t = v;
    for (int i = 0; i < w; ++i) t[i] = v[i + w];
    v += t;
  }
  return v[0];
#endif
}

// e^x for x <= 0, W lanes at a time (libm's expf is a call per element): 2^(x log2 e) as 2^n * 2^f,
// n = floor(t + 1/2), |f| <= 1/2, 2^f by Cephes' exp2f polynomial (relative error ~2e-7)
static inline vf exp_nonpositive(vf x) {
  vf t = x * 1.44269504f;
  t = t < -125.f ? vf{} - 125.f : t;
  const vf u = t + 0.5f;
  vi32 n = __builtin_convertvector(u, vi32);         // truncates towards zero:
  n += (__builtin_convertvector(n, vf) > u);          // one less where that rounded up (a true compare is -1)
  const vf f = t - __builtin_convertvector(n, vf);
  vf p = vf{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const vi32 bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(vf));
  return p * scale;
}

// sigmoid(x) = 1 / (1 + e^-x), through e^-|x| (never overflows): for x < 0 it is e^x / (1 + e^x)
static inline vf sigmoid_v(vf x) {
  const vf e = exp_nonpositive(x < 0 ? x : -x);
  const vf r = 1.f / (1.f + e);
  return x < 0 ? e * r : r;
}

// the first n <= W floats at p, zero past n, and back: masked loads and stores (a memcpy of a variable
// length is a libc call, a hot spot in the attention kernels' per-key row copies)
static inline vf load_part(const float* p, int64_t n) {
#if defined(__AVX512F__)
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
#elif defined(__AVX2__)
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
#else
  vf v{};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
#endif
}

static inline void store_part(float* p, vf v, int64_t n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
#elif defined(__AVX2__)
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), v);
#else
  std::memcpy(p, &v, n * sizeof(float));
#endif
}

// n <= W elements of a row of floats or of bf16 (any 16-bit T) as fp32, zero past n; and back, rounding
// to bf16 for a 16-bit T. A whole vector (n == W) is one load / store.
template <typename T>
static inline vf load_n(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == W ? load<vf>(p) : load_part(p, n);
  } else {
    if (n == W) return bf16_to_f32(reinterpret_cast<const uint8_t*>(p));
    uint16_t buf[W] = {};
    std::memcpy(buf, p, n * sizeof(uint16_t));
    return bf16_to_f32(reinterpret_cast<const uint8_t*>(buf));
  }
}

template <typename T>
static inline void store_n(T* p, vf v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == W) std::memcpy(p, &v, sizeof(vf));  // a constant size: one vector store, not a call
    else store_part(p, v, n);
  } else if (n == W) {
    store_bf16(p, v);
  } else {
    uint16_t buf[W];
    store_bf16(buf, v);
    std::memcpy(p, buf, n * sizeof(uint16_t));
  }
}

#if defined(__AVX512F__)
// r[16] as a 16 x 16 matrix of 32-bit lanes, transposed in place
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2)
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]), r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]), r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88), t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88), t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i)
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88), r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
}
#endif
