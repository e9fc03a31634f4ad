// Inline GEMM core of the pointwise (1x1) convolution: out[m, :] = epilogue(A[m, :] @ W^T).
//
// The classic register-tiled design: the weights are packed once per call into panels of NR
// output channels ([K][NR] each, zero-padded), a tile of MR pixels of A is packed (converted to
// float, SE channel scale applied on the way) into [K][MR], and the microkernel keeps the whole
// MR x NR tile of accumulators in registers while it streams K. The tile shape is chosen per
// ISA by the caller: AVX-512 12 x 32 floats (24 zmm accumulators), AVX2 6 x 16 (12 ymm), SSE
// 4 x 8. The epilogue applies the per-channel affine, the activation and the residual, and
// stores in the output dtype.
#pragma once
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dwsep/simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define EFFOPS_GEMM_X86 1
#else
#define EFFOPS_GEMM_X86 0
#endif

namespace effops::dwsep {

template <class F, int BYTES, int MR_, int NV_>
struct Tile {
  typedef F V __attribute__((vector_size(BYTES)));
  static constexpr int MR = MR_;
  static constexpr int NV = NV_;
  static constexpr int L = BYTES / static_cast<int>(sizeof(F));
  static constexpr int NR = NV * L;

  static EFFOPS_INLINE V load(const F* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static EFFOPS_INLINE V splat(F s) { return simd::splat<V>(s); }
};

// Panels [p0, p1) of NR output channels: Bp[(p * K + k) * NR + j] = w[(p * NR + j) * K + k], 0
// past Co; each k row scaled by cs[k] when cs is given (the SE channel scale of a one-image
// call, applied to the weights instead of to every row of A). Blocked transpose: a block of kKB
// k's of the panel's rows is read row by row (contiguous) and written into an L1-resident
// [kKB][NR] block of Bp; the naive order (scattered stores with stride NR over all of K) ran at
// ~2 cycles per element, most of a batch-1 pw_conv.
// The same for rows of activations (storage S, converted to F) in the transposed small-M GEMM
// (pw.cpp): there row r is scaled by its image's SE scale cs + (r / cs_hw) * K (cs_hw = 0: the
// one vector cs for every row, as for the weights).
template <class G, class S, class F>
void pack_panels(const S* w, int64_t Co, int64_t K, int64_t p0, int64_t p1, F* bp,
                 const F* cs = nullptr, int64_t cs_hw = 0) {
  constexpr int64_t NR = G::NR, kKB = 16;
  for (int64_t p = p0; p < p1; ++p) {
    F* dst = bp + p * K * NR;
    const int64_t jn = std::min<int64_t>(NR, Co - p * NR);
    for (int64_t k0 = 0; k0 < K; k0 += kKB) {
      const int64_t kn = std::min<int64_t>(kKB, K - k0);
      F* d = dst + k0 * NR;
      for (int64_t j = 0; j < jn; ++j) {
        const S* src = w + (p * NR + j) * K + k0;
        if (cs) {
          const F* c = cs + (cs_hw ? ((p * NR + j) / cs_hw) * K : 0) + k0;
          for (int64_t kk = 0; kk < kn; ++kk) d[kk * NR + j] = simd::to_f(src[kk]) * c[kk];
        } else {
          for (int64_t kk = 0; kk < kn; ++kk) d[kk * NR + j] = simd::to_f(src[kk]);
        }
      }
      for (int64_t kk = 0; kk < kn; ++kk)
        for (int64_t j = jn; j < NR; ++j) d[kk * NR + j] = F(0);
    }
  }
}

// A per-channel vector padded with zeros to whole panels (so epilogue loads never overrun).
template <class G, class F>
void pad_channels(const F* v, int64_t Co, std::vector<F>& out) {
  const int64_t padded = (Co + G::NR - 1) / G::NR * G::NR;
  out.assign(static_cast<size_t>(padded), F(0));
  if (v) std::copy(v, v + Co, out.begin());
}

// K is summed in chunks of kGemmKChunk, each from zero in registers, the chunk sums added into
// the tile: one long FMA chain over all of K (K = 1000-2700 in EfficientNet's late stages)
// rounds several times worse than torch's blocked GEMMs (6x at K = 1632), and a converted
// network drifted further from the float64 truth than the original; a tile load/add/store per
// 128 k costs nothing measurable.
inline constexpr int64_t kGemmKChunk = 128;

// tile[i * NR + j] = sum_k A(i, k) * Bp[k * NR + j] for the first r rows of a tile, where
// A(i, k) = ap[i * ars + k * aks]: packed ([K][MR]: ars 1, aks MR) or straight from the rows
// of the activations (ars = row stride, aks 1) when they need no conversion.
// EFFOPS_MICROKERNEL(NAME, TARGET, G, F, SET1) defines NAME(r, ap, bp, K, tile), a non-inlined
// function whose whole body (one unrolled variant per row count) is compiled for TARGET, with
// the R x NV accumulators in registers. SET1 is the broadcast intrinsic: GCC 12 lowers a generic
// vector construction from a run-time scalar inside target-attributed functions into a spill and
// reload, so the one broadcast per row and k is written with the intrinsic.
#define EFFOPS_MICROKERNEL(NAME, TARGET, G, F, SET1)                                           \
  template <int R>                                                                             \
  TARGET inline __attribute__((always_inline)) void NAME##_rows(                               \
      const F* __restrict ap, int64_t ars, int64_t aks, const F* __restrict bp, int64_t K,     \
      F* __restrict tile) {                                                                    \
    using V = typename G::V;                                                                   \
    V acc[R][G::NV];                                                                           \
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKChunk) {                                          \
      const int64_t k1 = k0 + kGemmKChunk < K ? k0 + kGemmKChunk : K;                          \
      _Pragma("GCC unroll 16") for (int i = 0; i < R; ++i)                                     \
          _Pragma("GCC unroll 4") for (int v = 0; v < G::NV; ++v) acc[i][v] = (V)SET1(F(0));   \
      for (int64_t k = k0; k < k1; ++k) {                                                      \
        V b[G::NV];                                                                            \
        _Pragma("GCC unroll 4") for (int v = 0; v < G::NV; ++v)                                \
            std::memcpy(&b[v], bp + k * G::NR + v * G::L, sizeof(V));                         \
        _Pragma("GCC unroll 16") for (int i = 0; i < R; ++i) {                                 \
          const V a = (V)SET1(ap[i * ars + k * aks]);                                          \
          _Pragma("GCC unroll 4") for (int v = 0; v < G::NV; ++v) acc[i][v] += a * b[v];       \
        }                                                                                      \
      }                                                                                        \
      _Pragma("GCC unroll 16") for (int i = 0; i < R; ++i)                                     \
          _Pragma("GCC unroll 4") for (int v = 0; v < G::NV; ++v) {                            \
        F* t = tile + i * G::NR + v * G::L;                                                    \
        if (k0 > 0) {                                                                          \
          V prev;                                                                              \
          std::memcpy(&prev, t, sizeof(V));                                                    \
          acc[i][v] += prev;                                                                   \
        }                                                                                      \
        std::memcpy(t, &acc[i][v], sizeof(V));                                                 \
      }                                                                                        \
    }                                                                                          \
    if (K <= 0) {                                                                              \
      for (int i = 0; i < R; ++i) std::memset(tile + i * G::NR, 0, sizeof(F) * G::NR);         \
    }                                                                                          \
  }                                                                                            \
  TARGET __attribute__((noinline)) void NAME(int r, const F* ap, int64_t ars, int64_t aks,     \
                                             const F* bp, int64_t K, F* tile) {                \
    switch (r) {                                                                               \
      case 1: return NAME##_rows<1>(ap, ars, aks, bp, K, tile);                                          \
      case 2: return NAME##_rows<(2 <= G::MR ? 2 : 1)>(ap, ars, aks, bp, K, tile);                       \
      case 3: return NAME##_rows<(3 <= G::MR ? 3 : 1)>(ap, ars, aks, bp, K, tile);                       \
      case 4: return NAME##_rows<(4 <= G::MR ? 4 : 1)>(ap, ars, aks, bp, K, tile);                       \
      case 5: return NAME##_rows<(5 <= G::MR ? 5 : 1)>(ap, ars, aks, bp, K, tile);                       \
      case 6: return NAME##_rows<(6 <= G::MR ? 6 : 1)>(ap, ars, aks, bp, K, tile);                       \
      case 7: return NAME##_rows<(7 <= G::MR ? 7 : 1)>(ap, ars, aks, bp, K, tile);                       \
      case 8: return NAME##_rows<(8 <= G::MR ? 8 : 1)>(ap, ars, aks, bp, K, tile);                       \
      case 9: return NAME##_rows<(9 <= G::MR ? 9 : 1)>(ap, ars, aks, bp, K, tile);                       \
      case 10: return NAME##_rows<(10 <= G::MR ? 10 : 1)>(ap, ars, aks, bp, K, tile);                    \
      case 11: return NAME##_rows<(11 <= G::MR ? 11 : 1)>(ap, ars, aks, bp, K, tile);                    \
      default: return NAME##_rows<(12 <= G::MR ? 12 : G::MR)>(ap, ars, aks, bp, K, tile);                \
    }                                                                                          \
  }

// The epilogue of one tile: rows [m0, m0 + mr), channels [n0, n0 + NR) clipped to Co.
// out/res rows have stride ldo (elements). scale/bias are padded to whole panels (or null).
// ACT: the activation code, or simd::kActRuntime for the run-time code `act`.
template <class G, int ACT, class F, class T>
EFFOPS_INLINE void epilogue(const F* tile, int mr, int64_t n0,
                            int64_t Co, const F* scale, const F* bias, const T* res, T* out,
                            int64_t ldo, int act = ACT) {
  if constexpr (ACT != simd::kActRuntime) act = ACT;
  using V = typename G::V;
  for (int i = 0; i < mr; ++i) {
    T* o = out + i * ldo;
    const T* r = res ? res + i * ldo : nullptr;
    for (int v = 0; v < G::NV; ++v) {
      const int64_t n = n0 + v * G::L;
      if (n >= Co) break;
      V val = G::load(tile + i * G::NR + v * G::L);
      if (scale) val = val * G::load(scale + n);
      if (bias) val = val + G::load(bias + n);
      val = simd::act_v(val, act);
      const int64_t lanes = std::min<int64_t>(G::L, Co - n);
      for (int64_t j = 0; j < lanes; ++j) {
        F s = val[j];
        if (r) s += simd::to_f(r[n + j]);
        simd::store_s(o + n + j, s);
      }
    }
  }
}

// Full-width store variant: all lanes in range; residual and conversion as vectors where the
// storage type has a vector load/store (float, double, bf16 with 16-lane float vectors). NB: the
// bf16 stores with vcvtneps2bf16 (simd::storev_native_bf16; only in code that runs on CPUs with
// AVX512_BF16, the vdpbf16ps / AMX GEMMs).
template <class G, int ACT, bool NB = false, class F, class T>
EFFOPS_INLINE void epilogue_fast(const F* tile, int mr, int64_t n0,
                                 int64_t Co, const F* scale, const F* bias, const T* res, T* out,
                                 int64_t ldo, int act = ACT) {
  using V = typename G::V;
  if constexpr (ACT != simd::kActRuntime) act = ACT;
  if (n0 + G::NR > Co) return epilogue<G, ACT>(tile, mr, n0, Co, scale, bias, res, out, ldo, act);
  for (int i = 0; i < mr; ++i) {
    T* o = out + i * ldo;
    const T* r = res ? res + i * ldo : nullptr;
    for (int v = 0; v < G::NV; ++v) {
      const int64_t n = n0 + v * G::L;
      V val = G::load(tile + i * G::NR + v * G::L);
      if (scale) val = val * G::load(scale + n);
      if (bias) val = val + G::load(bias + n);
      val = simd::act_v(val, act);
      if constexpr (std::is_same<T, F>::value) {
        if (r) val = val + G::load(r + n);
        std::memcpy(o + n, &val, sizeof val);
      } else if constexpr (std::is_same<T, simd::bf16>::value) {
        if (r) val = val + simd::loadv<V>(r + n);  // bf16 -> float exact, then one rounding
        if constexpr (NB && sizeof(V) == 64)
          simd::storev_native_bf16(o + n, val);
        else
          simd::storev(o + n, val);
      } else {
        for (int j = 0; j < G::L; ++j) {
          F s = val[j];
          if (r) s += simd::to_f(r[n + j]);
          simd::store_s(o + n + j, s);
        }
      }
    }
  }
}

// Epilogue of the transposed GEMM (out^T = W A^T, pw.cpp): tile[i * NR + j] is output channel
// co0 + i of pixel m0 + j. Affine and activation as vectors along the pixels (the channel's
// scale and bias broadcast), then stored with stride Co (out[(m0 + j) * Co + co0 + i]); the
// residual is added after the activation, as in epilogue().
template <class G, int ACT, class F, class T>
EFFOPS_INLINE void epilogue_t(const F* tile, int mr, int64_t co0, int64_t jn, int64_t Co,
                              const F* scale, const F* bias, const T* res, T* out, int act = ACT) {
  using V = typename G::V;
  if constexpr (ACT != simd::kActRuntime) act = ACT;
  alignas(64) F buf[G::NR];
  for (int i = 0; i < mr; ++i) {
    const int64_t co = co0 + i;
    const V s = G::splat(scale ? scale[co] : F(1)), b = G::splat(bias ? bias[co] : F(0));
    for (int v = 0; v < G::NV; ++v) {
      V val = G::load(tile + i * G::NR + v * G::L);
      if (scale) val = val * s;
      if (bias) val = val + b;
      val = simd::act_v(val, act);
      std::memcpy(buf + v * G::L, &val, sizeof val);
    }
    T* o = out + co;
    if (res) {
      const T* r = res + co;
      for (int64_t j = 0; j < jn; ++j) simd::store_s(o + j * Co, buf[j] + simd::to_f(r[j * Co]));
    } else {
      for (int64_t j = 0; j < jn; ++j) simd::store_s(o + j * Co, buf[j]);
    }
  }
}

}  // namespace effops::dwsep
