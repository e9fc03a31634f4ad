// Portable SIMD for the convolution kernels: GCC/Clang vector extensions of 64 bytes (16 floats
// or 8 doubles). Each kernel is compiled several times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 +
// FMA, baseline) and picked at run time (common/isa.h; EFFOPS_ISA caps the level), so one 64-byte vector is one zmm, two ymm or four xmm
// registers - no -march flag in the distributed build.
//
// Storage types: float, double and bf16 (uint16 bits of a bfloat16). Compute is float for float
// and bf16 storage (bf16 -> float is exact; float -> bf16 rounds to nearest even), double for
// double storage.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/isa.h"  // EFFOPS_ISA_DISPATCH: per-level copies, picked at run time
#define EFFOPS_INLINE inline __attribute__((always_inline))
#define EFFOPS_LAMBDA_INLINE __attribute__((always_inline))

namespace effops::simd {

struct bf16 {
  uint16_t bits;
};

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef double vd __attribute__((vector_size(64)));
typedef int64_t vl __attribute__((vector_size(64)));

// A vector of W bytes of E.
template <class E, int W>
struct VecOf {
  typedef E type __attribute__((vector_size(W)));
};

// Compute type and vector type of a storage type, for vectors of W bytes. Kernels compiled per
// ISA level use the level's native width (64 on AVX-512, 32 on AVX2, 16 on baseline; see
// vec_bytes): GCC lowers generic vectors wider than the target's registers element by element
// wherever a comparison, a select or a store is involved (through the stack), which made the
// AVX2 depthwise several times slower than it needs to be.
template <class T, int W = 64>
struct Traits {
  using F = float;
  using V = typename VecOf<float, W>::type;
  static constexpr int L = W / 4;
};
template <int W>
struct Traits<double, W> {
  using F = double;
  using V = typename VecOf<double, W>::type;
  static constexpr int L = W / 8;
};

// The native vector width in bytes of an ISA level (effops::Isa: 2 AVX-512, 1 AVX2, 0 baseline).
template <int I>
inline constexpr int vec_bytes = I >= 2 ? 64 : (I == 1 ? 32 : 16);

// ---- scalar conversions
EFFOPS_INLINE float to_f(float v) { return v; }
EFFOPS_INLINE double to_f(double v) { return v; }
EFFOPS_INLINE float to_f(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
EFFOPS_INLINE void store_s(float* p, float v) { *p = v; }
EFFOPS_INLINE void store_s(double* p, double v) { *p = v; }
EFFOPS_INLINE uint16_t f_to_bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
EFFOPS_INLINE void store_s(bf16* p, float v) { p->bits = f_to_bf16_bits(v); }

// ---- vector loads/stores (unaligned)
// A vector with every lane s. Written as s - {0, ...}: exact for every s (x - (+0) = x, -0
// and NaN included), and GCC emits one broadcast for it. (A braced list {s, s, ...} or a
// per-lane loop became a chain of masked inserts inside target-attributed functions.)
template <class V>
EFFOPS_INLINE V splat(typename std::remove_cv<typename std::remove_reference<decltype(V()[0])>::type>::type s) {
  return s - V{};
}
EFFOPS_INLINE vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
EFFOPS_INLINE vd loadv(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
EFFOPS_INLINE vf loadv(const bf16* p);  // defined below, with the width-generic form
// Width-generic forms: loadv<V>(p) loads one V; storev(p, v) stores a V of any width.
template <class V>
EFFOPS_INLINE V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
EFFOPS_INLINE V loadv(const double* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// bf16 -> float of one vector: the bf16 bits become the high half of each 32-bit lane. For
// 64-byte vectors (AVX-512) written as a zero interleave (one vpermi2w): GCC 12 splits
// __builtin_convertvector(16 x u16 -> 16 x u32) into 128-bit halves and re-inserts them, five
// instructions per load, which made the bf16 depthwise 5x slower than the float one. Narrower
// vectors widen in one instruction (vpmovzxwd / punpcklwd) either way.
template <class V>
EFFOPS_INLINE V loadv(const bf16* p) {
  using U = typename VecOf<uint32_t, sizeof(V)>::type;
  V f;
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
  if constexpr (sizeof(V) == 64) {
    using H = typename VecOf<uint16_t, 32>::type;
    H h;
    std::memcpy(&h, p, sizeof h);
    const H z = {};
    const auto r = __builtin_shufflevector(z, h, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24,
                                           9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    static_assert(sizeof(r) == sizeof(V), "interleave of 16 bf16 with zeros is 64 bytes");
    std::memcpy(&f, &r, sizeof f);
    return f;
  }
#endif
  using H = typename VecOf<uint16_t, sizeof(V) / 2>::type;
  H h;
  std::memcpy(&h, p, sizeof h);
  U u = __builtin_convertvector(h, U) << 16;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
EFFOPS_INLINE vf loadv(const bf16* p) { return loadv<vf>(p); }
template <class V>
EFFOPS_INLINE void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
template <class V>
EFFOPS_INLINE void storev(double* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
template <class V>
EFFOPS_INLINE void storev(bf16* p, V v) {
  using H = typename VecOf<uint16_t, sizeof(V) / 2>::type;
  using U = typename VecOf<uint32_t, sizeof(V)>::type;
  U u;
  std::memcpy(&u, &v, sizeof u);
  const U nan = (u & 0x7fffffffu) > 0x7f800000u;
  U r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = (nan & ((u >> 16) | 0x40u)) | (~nan & r);
  H h = __builtin_convertvector(r, H);
  std::memcpy(p, &h, sizeof h);
}

// 16 floats -> bf16 with vcvtneps2bf16 (AVX512_BF16; for code that runs only where the CPU has
// it): round to nearest even and NaN quieted as storev's, but input denormals are read as zero
// and denormal results flushed to zero (the instruction ignores MXCSR), as vdpbf16ps reads its
// inputs. One instruction where storev's emulation takes about seven. Inline asm: no target
// attribute needed at the call sites.
EFFOPS_INLINE void storev_native_bf16(bf16* p, vf v) {
#if EFFOPS_X86
  vh h;
  __asm__("vcvtneps2bf16 %1, %0" : "=v"(h) : "v"(v));
  std::memcpy(p, &h, sizeof h);
#else
  storev(p, v);
#endif
}

// ---- math
// Clamps that keep NaN (as torch's activations do): the comparison is false for NaN.
template <class V, class S>
EFFOPS_INLINE V clamp_lo(V x, S lo) {
  return x < lo ? splat<V>(lo) : x;
}
template <class V, class S>
EFFOPS_INLINE V clamp_hi(V x, S hi) {
  return x > hi ? splat<V>(hi) : x;
}

template <class V>
using elem_t = typename std::remove_cv<typename std::remove_reference<decltype(V()[0])>::type>::type;

// exp(x) for float vectors of any width: Cody-Waite reduction x = n ln2 + r, degree-5
// polynomial for e^r, scaling by 2^n through the exponent bits (within 2.4 ulp of the float64
// value in SiLU over N(0, 3) inputs; inputs clamped to [-87.3, 88.7], NaN kept). n is rounded by
// adding 1.5 * 2^23 + 127, whose low mantissa bits are then n + 127: shifted into the exponent
// field they are 2^n without a float -> int conversion. Against the degree-6 form with the
// conversion (1.2 ulp) this is 13% fewer instructions, 25% less SiLU time (an L2-resident
// AVX-512 loop, Xeon), and SiLU is the largest cost of the epilogues of EfficientNet's expand
// convs. Double vectors use std::exp per lane (tests only).
template <class V>
EFFOPS_INLINE V vexp(V x) {
  if constexpr (std::is_same<elem_t<V>, float>::value) {
    typedef int32_t VI __attribute__((vector_size(sizeof(V))));
    x = clamp_hi(clamp_lo(x, -87.3f), 88.7f);
    const V magic = splat<V>(12582912.0f + 127.0f);
    const V t = x * 1.44269504088896341f + magic;
    const V n = t - magic;  // round(x / ln2)
    V r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    V p = splat<V>(1.3981999507e-3f);
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    VI e;
    std::memcpy(&e, &t, sizeof e);
    e = e << 23;
    V s;
    std::memcpy(&s, &e, sizeof s);
    return p * s;
  } else {
    V r;
    for (unsigned i = 0; i < sizeof(V) / sizeof(double); ++i) r[i] = std::exp(x[i]);
    return r;
  }
}
EFFOPS_INLINE float sexp(float x) {
  using V4 = VecOf<float, 16>::type;  // one xmm on every level
  V4 v = splat<V4>(x);
  return vexp(v)[0];
}
EFFOPS_INLINE double sexp(double x) { return std::exp(x); }

// sum_i a[i] * b[i] in a fixed order: 8 interleaved partial sums (lane i % 8, which the compiler
// keeps in vector registers: one dependent chain per lane instead of one for the whole row; a
// 1152 x 48 squeeze-excite took 52 us with a single chain, torch's GEMM 21), the lanes combined
// in a fixed order, then the tail. The same on every ISA level (the SE MLPs of BlockPlan and
// q_se_gates).
inline float dot8(const float* a, const float* b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  float r = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// Activation codes, shared with Python (ops/dwsep.py ACTIVATIONS order).
enum Act : int { kNone = 0, kRelu = 1, kRelu6 = 2, kSilu = 3, kHardswish = 4, kSigmoid = 5 };
// A template argument that means "the activation is a run-time value" (see with_epilogue_act).
inline constexpr int kActRuntime = -1;

template <class V>
EFFOPS_INLINE V act_v(V x, int act) {
  using S = elem_t<V>;
  switch (act) {
    case kRelu:
      return clamp_lo(x, S(0));
    case kRelu6:
      return clamp_hi(clamp_lo(x, S(0)), S(6));
    case kSilu:
      return x / (S(1) + vexp(-x));
    case kHardswish:
      return x * clamp_hi(clamp_lo(x + S(3), S(0)), S(6)) * S(1.0 / 6.0);
    case kSigmoid:
      return S(1) / (S(1) + vexp(-x));
    default:
      return x;
  }
}

template <class S>
EFFOPS_INLINE S act_s(S x, int act) {
  switch (act) {
    case kRelu:
      return x < S(0) ? S(0) : x;
    case kRelu6:
      return x < S(0) ? S(0) : (x > S(6) ? S(6) : x);
    case kSilu:
      return x / (S(1) + sexp(-x));
    case kHardswish: {
      S t = x + S(3);
      t = t < S(0) ? S(0) : (t > S(6) ? S(6) : t);
      return x * t * S(1.0 / 6.0);
    }
    case kSigmoid:
      return S(1) / (S(1) + sexp(-x));
    default:
      return x;
  }
}

}  // namespace effops::simd
