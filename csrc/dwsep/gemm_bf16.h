// The pointwise GEMM for bf16 activations on CPUs with AVX512_BF16 (vdpbf16ps): two bf16
// products per 32-bit lane and instruction, summed into float accumulators. Twice the
// multiply-adds per instruction of the float microkernel, which converted bf16 to float and ran
// at the float rate (bf16 autocast was slower than float: the conversions came on top).
//
// Numbers: A (activations, times the SE channel scale when there is one) and W are rounded to
// bf16 (round to nearest even) - what eager bf16 autocast does to both operands of a conv -
// and every product is accumulated in float, K summed in chunks (kGemmKChunk) as the float
// kernel does. vdpbf16ps treats bf16 denormal inputs as zero (the Intel SDM's DAZ/FTZ rule for
// the instruction); bf16 denormals are below 1.2e-38.
//
// Layout: K is taken in pairs (k = 2 k2, 2 k2 + 1; a zero pads an odd K). The weights of a
// panel of 32 output channels are [K2][32][2] bf16 (lane j of the two zmm loads per k2 holds
// channel j's pair); a row of A is read as 32-bit pairs, one broadcast per row and k2, straight
// from bf16 activations with an even K and no SE scale, else from a packed [12][K2] tile. The tile (12 x 32 floats) and the epilogue are the float AVX-512 kernel's (gemm_core.h).
#pragma once
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#include "dwsep/gemm_core.h"
#include "dwsep/simd.h"

#if EFFOPS_GEMM_X86 && EFFOPS_HAS_BF16_TARGET
#define EFFOPS_HAS_BF16DOT 1
#else
#define EFFOPS_HAS_BF16DOT 0
#endif

namespace effops::dwsep {

// The CPU executes vdpbf16ps (checked once).
inline bool cpu_has_bf16dot() {
#if EFFOPS_HAS_BF16DOT
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
#else
  return false;
#endif
}

inline constexpr int kBfMR = 12;  // rows of A per tile
inline constexpr int kBfNR = 32;  // output channels per panel (two zmm of float accumulators)

// Weights [Co][K] float -> panels [P][K2][32][2] of bf16 bits, zero past Co and K (each k
// scaled by cs[k] when given, see pack_panels). K2 = ceil(K / 2) pairs, or k2p >= that (the AMX
// kernel's whole chunks, gemm_amx.h).
template <class F>
void pack_panels_bf16(const F* w, int64_t Co, int64_t K, int64_t p0, int64_t p1, uint16_t* bp,
                      const F* cs = nullptr, int64_t k2p = 0) {
  const int64_t K2 = std::max<int64_t>(k2p, (K + 1) / 2);
  constexpr int64_t kKB = 16;  // k's per block (8 pairs): blocked as pack_panels (gemm_core.h)
  for (int64_t p = p0; p < p1; ++p) {
    uint16_t* dst = bp + p * K2 * kBfNR * 2;
    const int64_t jn = std::min<int64_t>(kBfNR, Co - p * kBfNR);
    for (int64_t k0 = 0; k0 < 2 * K2; k0 += kKB) {
      const int64_t kn = std::min<int64_t>(kKB, 2 * K2 - k0);
      uint16_t* d = dst + k0 * kBfNR;  // pair k / 2 starts at (k / 2) * kBfNR * 2 = k * kBfNR
      for (int64_t j = 0; j < jn; ++j) {
        const F* src = w + (p * kBfNR + j) * K;
        for (int64_t kk = 0; kk < kn; ++kk) {
          const int64_t k = k0 + kk;
          d[(kk / 2) * kBfNR * 2 + j * 2 + (k & 1)] =
              k < K ? simd::f_to_bf16_bits(static_cast<float>(cs ? src[k] * cs[k] : src[k])) : uint16_t(0);
        }
      }
      for (int64_t kk = 0; kk < kn; ++kk)
        for (int64_t j = jn; j < kBfNR; ++j) d[(kk / 2) * kBfNR * 2 + j * 2 + ((k0 + kk) & 1)] = 0;
    }
  }
}

EFFOPS_INLINE uint16_t bf16_bits_of(float v) { return simd::f_to_bf16_bits(v); }
EFFOPS_INLINE uint16_t bf16_bits_of(simd::bf16 v) { return v.bits; }

// Rows [m0, m0 + mr) of A (row stride lda, K columns) as bf16 rows ap[i * ldp + k] (ldp even,
// a zero after an odd K), each row scaled by its image's SE channel scale cs[(row / hw) * K + k]
// when cs is given. 16 lanes at a time (vcvtneps2bf16: round to nearest even, denormals to zero -
// which vdpbf16ps and the AMX tiles read as zero anyway; the scalar tail rounds the same otherwise).
template <class S>
EFFOPS_INLINE void pack_rows_bf16(const S* a, int64_t lda, int64_t m0, int mr, int64_t K,
                                  const float* cs, int64_t hw, uint16_t* ap, int64_t ldp) {
  for (int i = 0; i < mr; ++i) {
    const S* row = a + (m0 + i) * lda;
    const float* c = cs ? cs + ((m0 + i) / hw) * K : nullptr;
    uint16_t* dst = ap + i * ldp;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      simd::vf v = simd::loadv<simd::vf>(row + k);
      if (c) v = v * simd::loadv<simd::vf>(c + k);
      simd::storev_native_bf16(reinterpret_cast<simd::bf16*>(dst + k), v);
    }
    for (; k < K; ++k) dst[k] = c ? bf16_bits_of(simd::to_f(row[k]) * c[k]) : bf16_bits_of(row[k]);
    if (K & 1) dst[K] = 0;
  }
}

#if EFFOPS_HAS_BF16DOT
// tile[i * 32 + j] = sum over k of A(i, k) W(j, k), for the first R rows.
template <int R>
EFFOPS_TARGET_BF16 inline __attribute__((always_inline)) void bf16dot_rows(
    const uint16_t* __restrict ap, int64_t ars, const uint16_t* __restrict bp, int64_t K2, float* __restrict tile) {
  constexpr int64_t chunk = kGemmKChunk / 2;
  __m512 acc[R][2];
  for (int64_t k0 = 0; k0 < K2; k0 += chunk) {
    const int64_t k1 = k0 + chunk < K2 ? k0 + chunk : K2;
    _Pragma("GCC unroll 16") for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      const __m512i b0 = _mm512_loadu_si512(bp + k * 2 * kBfNR);
      const __m512i b1 = _mm512_loadu_si512(bp + k * 2 * kBfNR + kBfNR);
      _Pragma("GCC unroll 16") for (int i = 0; i < R; ++i) {
        int32_t pair;  // (A(i, 2k), A(i, 2k + 1)); memcpy: bf16 rows are only 2-byte aligned
        std::memcpy(&pair, ap + 2 * (i * ars + k), sizeof pair);
        const __m512i a = _mm512_set1_epi32(pair);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)a, (__m512bh)b0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)a, (__m512bh)b1);
      }
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < R; ++i) {
      float* t = tile + i * kBfNR;
      if (k0 > 0) {
        acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_loadu_ps(t));
        acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_loadu_ps(t + 16));
      }
      _mm512_storeu_ps(t, acc[i][0]);
      _mm512_storeu_ps(t + 16, acc[i][1]);
    }
  }
  if (K2 <= 0) std::memset(tile, 0, sizeof(float) * R * kBfNR);
}

EFFOPS_TARGET_BF16 __attribute__((noinline)) inline void bf16dot_micro(int r, const uint16_t* ap, int64_t ars,
                                                                       const uint16_t* bp, int64_t K2, float* tile) {
  switch (r) {
    case 1: return bf16dot_rows<1>(ap, ars, bp, K2, tile);
    case 2: return bf16dot_rows<2>(ap, ars, bp, K2, tile);
    case 3: return bf16dot_rows<3>(ap, ars, bp, K2, tile);
    case 4: return bf16dot_rows<4>(ap, ars, bp, K2, tile);
    case 5: return bf16dot_rows<5>(ap, ars, bp, K2, tile);
    case 6: return bf16dot_rows<6>(ap, ars, bp, K2, tile);
    case 7: return bf16dot_rows<7>(ap, ars, bp, K2, tile);
    case 8: return bf16dot_rows<8>(ap, ars, bp, K2, tile);
    case 9: return bf16dot_rows<9>(ap, ars, bp, K2, tile);
    case 10: return bf16dot_rows<10>(ap, ars, bp, K2, tile);
    case 11: return bf16dot_rows<11>(ap, ars, bp, K2, tile);
    default: return bf16dot_rows<12>(ap, ars, bp, K2, tile);
  }
}
#endif

}  // namespace effops::dwsep
