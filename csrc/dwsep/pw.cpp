// Pointwise conv (GEMM with fused prologue/epilogue) and the fused depthwise-separable conv.
//
// ISA dispatch is explicit here because the register tile differs per ISA (see gemm_core.h):
// each task body is compiled three times (AVX-512, AVX2+FMA, baseline; float64, which exists for
// gradcheck and tests, at the baseline level only) and the driver packs the weights for the tile
// of the ISA it picked at run time. The epilogues specialise none and silu at compile time, the
// other activations run through a run-time switch (with_epilogue_act in dw_core.h).
//
// Fused depthwise-separable conv: a task is a block of output rows of one image. It computes the
// depthwise stage for P pixels at a time (crossing row ends) into a small float buffer (cache-resident), then
// runs the pointwise GEMM on that buffer and writes the output: the input is read once, the
// output written once, and the depthwise result never goes to memory.
#include <algorithm>
#include <vector>

#include "common/parallel.h"
#include "dwsep/conv.h"
#include "dwsep/dw_core.h"
#include "dwsep/gemm_amx.h"
#include "dwsep/gemm_bf16.h"
#include "dwsep/gemm_core.h"

#include "common/isa.h"

#define EFFOPS_COMMA ,

namespace effops::dwsep {
namespace {

using ::effops::Isa;
using ::effops::kBase;
using ::effops::kV3;
using ::effops::kV4;

// The level the kernels run at (EFFOPS_ISA / effops.set_isa cap the detected one).
inline Isa cpu_isa() { return ::effops::isa(); }

template <class F, Isa I>
struct TileFor;
template <class F>
struct TileFor<F, kV4> {
  using type = Tile<F, 64, 12, 2>;
};
template <class F>
struct TileFor<F, kV3> {
  using type = Tile<F, 32, 6, 2>;
};
template <class F>
struct TileFor<F, kBase> {
  using type = Tile<F, 16, 4, 2>;
};

// The microkernels, one non-inlined function per ISA and accumulation type (gemm_core.h).
// micro(tag, ...) picks the one matching the tile of the ISA the caller was compiled for.
#if EFFOPS_X86
EFFOPS_MICROKERNEL(micro_v4_f, EFFOPS_TARGET_V4, TileFor<float EFFOPS_COMMA kV4>::type, float, _mm512_set1_ps)
EFFOPS_MICROKERNEL(micro_v3_f, EFFOPS_TARGET_V3, TileFor<float EFFOPS_COMMA kV3>::type, float, _mm256_set1_ps)
EFFOPS_MICROKERNEL(micro_b_f, , TileFor<float EFFOPS_COMMA kBase>::type, float, _mm_set1_ps)
EFFOPS_MICROKERNEL(micro_b_d, , TileFor<double EFFOPS_COMMA kBase>::type, double, _mm_set1_pd)
#else
EFFOPS_MICROKERNEL(micro_b_f, , TileFor<float EFFOPS_COMMA kBase>::type, float, simd::splat<TileFor<float EFFOPS_COMMA kBase>::type::V>)
EFFOPS_MICROKERNEL(micro_b_d, , TileFor<double EFFOPS_COMMA kBase>::type, double, simd::splat<TileFor<double EFFOPS_COMMA kBase>::type::V>)
#endif
// The first vector of a tile's columns (half of a panel): B panels and tile rows keep the full
// tile's stride NR, so it runs on the same packed panels and tile buffer (pwt_task_body's tail).
template <class G>
struct HalfTile {
  using V = typename G::V;
  static constexpr int MR = G::MR;
  static constexpr int NV = 1;
  static constexpr int L = G::L;
  static constexpr int NR = G::NR;
  template <class F>
  static EFFOPS_INLINE V load(const F* p) { return G::load(p); }
  template <class F>
  static EFFOPS_INLINE V splat(F s) { return G::splat(s); }
};
static_assert(TileFor<float, kV4>::type::NV == 2 && TileFor<float, kV3>::type::NV == 2 &&
              TileFor<float, kBase>::type::NV == 2, "HalfTile is half of a two-vector tile");
#if EFFOPS_X86
EFFOPS_MICROKERNEL(microh_v4_f, EFFOPS_TARGET_V4, HalfTile<TileFor<float EFFOPS_COMMA kV4>::type>, float, _mm512_set1_ps)
EFFOPS_MICROKERNEL(microh_v3_f, EFFOPS_TARGET_V3, HalfTile<TileFor<float EFFOPS_COMMA kV3>::type>, float, _mm256_set1_ps)
EFFOPS_MICROKERNEL(microh_b_f, , HalfTile<TileFor<float EFFOPS_COMMA kBase>::type>, float, _mm_set1_ps)
EFFOPS_MICROKERNEL(microh_b_d, , HalfTile<TileFor<double EFFOPS_COMMA kBase>::type>, double, _mm_set1_pd)
#else
EFFOPS_MICROKERNEL(microh_b_f, , HalfTile<TileFor<float EFFOPS_COMMA kBase>::type>, float, simd::splat<TileFor<float EFFOPS_COMMA kBase>::type::V>)
EFFOPS_MICROKERNEL(microh_b_d, , HalfTile<TileFor<double EFFOPS_COMMA kBase>::type>, double, simd::splat<TileFor<double EFFOPS_COMMA kBase>::type::V>)
#endif
// The microkernel of ISA I for accumulation type F: the full tile's, or (HALF) the half tile's.
template <Isa I, bool HALF = false, class F>
EFFOPS_INLINE void micro(int r, const F* ap, int64_t ars, int64_t aks, const F* bp, int64_t K,
                         F* tile) {
  constexpr bool f32 = std::is_same<F, float>::value;
  static_assert(f32 || I == kBase, "float64 runs at the baseline level only");
#if EFFOPS_X86
  if constexpr (f32 && I == kV4) return (HALF ? microh_v4_f : micro_v4_f)(r, ap, ars, aks, bp, K, tile);
  else if constexpr (f32 && I == kV3) return (HALF ? microh_v3_f : micro_v3_f)(r, ap, ars, aks, bp, K, tile);
  else
#endif
  if constexpr (f32) return (HALF ? microh_b_f : micro_b_f)(r, ap, ars, aks, bp, K, tile);
  else return (HALF ? microh_b_d : micro_b_d)(r, ap, ars, aks, bp, K, tile);
}

// Packs rows [m0, m0 + mr) of A (row stride lda, K columns, storage S) as ap[k * MR + i], in the
// accumulation type, each row scaled by its image's SE channel scale when cs is given.
template <class G, class S, class F>
EFFOPS_INLINE void pack_rows(const S* a, int64_t lda, int64_t m0, int mr, int64_t K,
                             const F* cs, int64_t hw, F* ap) {
  for (int i = 0; i < mr; ++i) {
    const S* row = a + (m0 + i) * lda;
    const F* c = cs ? cs + ((m0 + i) / hw) * K : nullptr;
    F* dst = ap + i;
    if (c)
      for (int64_t k = 0; k < K; ++k) dst[k * G::MR] = simd::to_f(row[k]) * c[k];
    else
      for (int64_t k = 0; k < K; ++k) dst[k * G::MR] = simd::to_f(row[k]);
  }
}

// GEMM over rows [m_begin, m_end) of A into out (row stride ldo), all output channels.
template <Isa I, class S, class F, class T>
EFFOPS_INLINE void gemm_rows(const S* a, int64_t lda, int64_t m_begin, int64_t m_end, int64_t K,
                             const F* cs, int64_t hw, const F* bp, int64_t Co, const F* scale,
                             const F* bias, int act, const T* res, T* out, int64_t ldo,
                             std::vector<F>& ap, int64_t p_begin = 0, int64_t p_end = -1) {
  using G = typename TileFor<F, I>::type;
  ap.resize(static_cast<size_t>(K * G::MR));
  alignas(64) F tile[G::MR * G::NR];
  const int64_t panels = p_end < 0 ? (Co + G::NR - 1) / G::NR : p_end;
  // A needs packing only to convert its storage type or to apply the SE channel scale.
  constexpr bool direct_ok = std::is_same<S, F>::value;
  const bool direct = direct_ok && !cs;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += G::MR) {
    const int mr = static_cast<int>(std::min<int64_t>(G::MR, m_end - m0));
    const F* a_tile = ap.data();
    int64_t ars = 1, aks = G::MR;
    if constexpr (direct_ok) {
      if (direct) a_tile = reinterpret_cast<const F*>(a) + m0 * lda, ars = lda, aks = 1;
    }
    if (!direct) pack_rows<G>(a, lda, m0, mr, K, cs, hw, ap.data());
    for (int64_t p = p_begin; p < panels; ++p) {
      if (Co - p * G::NR <= G::L) {  // a last panel of at most one vector of channels: half the work
        micro<I, true>(mr, a_tile, ars, aks, bp + p * K * G::NR, K, tile);
        with_epilogue_act(act, [&](auto A) EFFOPS_LAMBDA_INLINE {
          epilogue<HalfTile<G>, A()>(tile, mr, p * G::NR, Co, scale, bias,
                                     res ? res + (m0 - m_begin) * ldo : nullptr,
                                     out + (m0 - m_begin) * ldo, ldo, act);
        });
        continue;
      }
      micro<I>(mr, a_tile, ars, aks, bp + p * K * G::NR, K, tile);
      with_epilogue_act(act, [&](auto A) EFFOPS_LAMBDA_INLINE {
        epilogue_fast<G, A()>(tile, mr, p * G::NR, Co, scale, bias,
                              res ? res + (m0 - m_begin) * ldo : nullptr,
                              out + (m0 - m_begin) * ldo, ldo, act);
      });
    }
  }
}

#if EFFOPS_HAS_BF16DOT
// gemm_rows for bf16 outputs with vdpbf16ps (gemm_bf16.h): A from bf16 rows (pw_conv) or from
// the fused kernel's float depthwise buffer, rounded to bf16 while a tile is packed.
template <class S, class T>
EFFOPS_TARGET_BF16 void gemm_rows_bf16dot(const S* a, int64_t lda, int64_t m_begin, int64_t m_end, int64_t K,
                                          const float* cs, int64_t hw, const uint16_t* bp, int64_t Co,
                                          const float* scale, const float* bias, int act, const T* res, T* out,
                                          int64_t ldo, std::vector<uint16_t>& ap, int64_t p_begin = 0,
                                          int64_t p_end = -1) {
  using G = typename TileFor<float, kV4>::type;
  static_assert(G::NR == kBfNR && G::MR == kBfMR, "the bf16 tile is the float AVX-512 tile");
  const int64_t K2 = (K + 1) / 2;
  ap.resize(static_cast<size_t>(K2 * 2 * kBfMR));
  alignas(64) float tile[kBfMR * kBfNR];
  const int64_t panels = p_end < 0 ? (Co + kBfNR - 1) / kBfNR : p_end;
  // bf16 rows with an even K (and even row stride) and no SE scale are already bf16 pairs.
  const bool direct = std::is_same<S, simd::bf16>::value && !cs && K % 2 == 0 && lda % 2 == 0;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kBfMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kBfMR, m_end - m0));
    const uint16_t* a_tile;  // rows of bf16 pairs, ars pairs apart
    int64_t ars;
    if constexpr (std::is_same<S, simd::bf16>::value) {
      if (direct) a_tile = &(a + m0 * lda)->bits, ars = lda / 2;
    }
    if (!direct) {
      pack_rows_bf16(a, lda, m0, mr, K, cs, hw, ap.data(), 2 * K2);
      a_tile = ap.data(), ars = K2;
    }
    for (int64_t p = p_begin; p < panels; ++p) {
      bf16dot_micro(mr, a_tile, ars, bp + p * K2 * 2 * kBfNR, K2, tile);
      with_epilogue_act(act, [&](auto A) EFFOPS_LAMBDA_INLINE {
        epilogue_fast<G, A(), true>(tile, mr, p * kBfNR, Co, scale, bias, res ? res + (m0 - m_begin) * ldo : nullptr,
                              out + (m0 - m_begin) * ldo, ldo, act);
      });
    }
  }
}
#endif

#if EFFOPS_HAS_AMX
// gemm_rows for bf16 rows with the AMX tiles (gemm_amx.h): blocks of 32 rows, A straight from
// the activations (bf16 rows, no SE scale, 32 rows: only the K tail copied into a zero-padded
// tile) or packed (SE scale, the last rows of a task: zero rows past them), the float tile
// through the AVX-512 epilogue. bp: panels of k2p pairs (amx::panel_pairs(K)).
template <class T>
EFFOPS_TARGET_BF16 void gemm_rows_amx(const simd::bf16* a, int64_t lda, int64_t m_begin, int64_t m_end, int64_t K,
                                      const float* cs, int64_t hw, const uint16_t* bp, int64_t k2p, int64_t Co,
                                      const float* scale, const float* bias, int act, const T* res, T* out,
                                      int64_t ldo, std::vector<uint16_t>& ap, int64_t p_begin = 0,
                                      int64_t p_end = -1) {
  using G = typename TileFor<float, kV4>::type;
  static_assert(G::NR == kBfNR, "the AMX block is 32 channels: the float AVX-512 tile's width");
  constexpr int64_t R = amx::kRows, KC = amx::kKChunk;
  const int64_t kc = k2p * 2 / KC, kfull = K / KC, Kp = kc * KC;
  alignas(64) float tile[R * kBfNR];
  alignas(64) uint16_t tail[R * KC];
  ap.resize(static_cast<size_t>(R * Kp));
  const int64_t panels = p_end < 0 ? (Co + kBfNR - 1) / kBfNR : p_end;
  amx::configure();
  for (int64_t m0 = m_begin; m0 < m_end; m0 += R) {
    const int mr = static_cast<int>(std::min<int64_t>(R, m_end - m0));
    const uint16_t* at;
    int64_t as, kf;
    if (!cs && mr == R) {
      at = &(a + m0 * lda)->bits, as = lda * 2, kf = kfull;
      if (kf < kc) {
        for (int64_t i = 0; i < R; ++i) {
          const uint16_t* row = at + i * lda + kf * KC;
          uint16_t* d = tail + i * KC;
          int64_t k = 0;
          for (; k < K - kf * KC; ++k) d[k] = row[k];
          for (; k < KC; ++k) d[k] = 0;
        }
      }
    } else {  // the vdpbf16ps kernel's row packing (SE scale, bf16 rounding), zeros past K and mr
      pack_rows_bf16(a, lda, m0, mr, K, cs, hw, ap.data(), Kp);
      for (int64_t i = 0; i < R; ++i)
        std::fill(ap.data() + i * Kp + (i < mr ? K : 0), ap.data() + (i + 1) * Kp, uint16_t(0));
      at = ap.data(), as = Kp * 2, kf = kc;
    }
    for (int64_t p = p_begin; p < panels; ++p) {
      amx::block(at, as, kf, tail, kc, bp + p * k2p * 2 * kBfNR, tile);
      with_epilogue_act(act, [&](auto A) EFFOPS_LAMBDA_INLINE {
        epilogue_fast<G, A(), true>(tile, mr, p * kBfNR, Co, scale, bias, res ? res + (m0 - m_begin) * ldo : nullptr,
                              out + (m0 - m_begin) * ldo, ldo, act);
      });
    }
  }
  amx::release();
}
#endif

// ---------------------------------------------------------------- pointwise
template <class T>
struct PwArgs {
  const T* y;
  const Acc<T>* bp;
  const Acc<T>* cs;
  const Acc<T>* scale;
  const Acc<T>* bias;
  int act;
  const T* res;
  T* out;
  int64_t HW, C, Co, M, rpt;
  const uint16_t* bpb = nullptr;  // bf16-pair weight panels: the vdpbf16ps GEMM (gemm_bf16.h)
  int64_t k2p = 0;                // > 0: bpb has k2p pairs per panel, for the AMX GEMM (gemm_amx.h)
  int64_t groups = 1, ppt = 0;    // a task: rows [rpt * (t / groups), ...) x panels ppt * (t % groups) + [0, ppt)
  // The transposed small-M GEMM (pwt_task_body): the weights as they are, the pixels packed.
  const Acc<T>* w = nullptr;
  const Acc<T>* apt = nullptr;  // pixel panels [M / NR][C][NR]
  int64_t bpt = 0;              // MR-channel blocks per task
};

template <Isa I, class T>
EFFOPS_INLINE void pw_task_body(const PwArgs<T>& a, int64_t task) {
  using F = Acc<T>;
  thread_local std::vector<F> ap;
  const int64_t m0 = (task / a.groups) * a.rpt, m1 = std::min(a.M, m0 + a.rpt);
  if (m0 >= m1) return;
  const int64_t p0 = (task % a.groups) * a.ppt, p1 = a.groups > 1 ? p0 + a.ppt : -1;  // clipped below
  const int64_t nr = a.bpb ? int64_t(kBfNR) : int64_t(TileFor<F, I>::type::NR);
  const int64_t pe = p1 < 0 ? -1 : std::min(p1, (a.Co + nr - 1) / nr);
  if (pe >= 0 && p0 >= pe) return;
#if EFFOPS_HAS_BF16DOT
  if constexpr (I == kV4 && std::is_same<T, simd::bf16>::value) {
    if (a.bpb) {
      thread_local std::vector<uint16_t> apb;
#if EFFOPS_HAS_AMX
      if (a.k2p)
        return gemm_rows_amx(a.y, a.C, m0, m1, a.C, a.cs, a.HW, a.bpb, a.k2p, a.Co, a.scale, a.bias, a.act,
                             a.res ? a.res + m0 * a.Co : nullptr, a.out + m0 * a.Co, a.Co, apb, p0, pe);
#endif
      return gemm_rows_bf16dot(a.y, a.C, m0, m1, a.C, a.cs, a.HW, a.bpb, a.Co, a.scale, a.bias, a.act,
                               a.res ? a.res + m0 * a.Co : nullptr, a.out + m0 * a.Co, a.Co, apb, p0, pe);
    }
  }
#endif
  gemm_rows<I>(a.y, a.C, m0, m1, a.C, a.cs, a.HW, a.bp, a.Co, a.scale, a.bias, a.act,
               a.res ? a.res + m0 * a.Co : nullptr, a.out + m0 * a.Co, a.Co, ap, p0, pe);
}

// Few pixels, many output channels (batch 1 on 7x7 / 14x14 maps): out^T = W A^T. The weights are
// the microkernel's row operand straight from [Co][C] (no packing: at batch 1 packing them cost
// two thirds of the GEMM itself), the pixels are packed into panels of NR ([C][NR] each, SE scale
// applied), and a task computes MR-channel blocks against every pixel panel (the panels, C * M
// floats, stay in L2). The epilogue stores the transposed tile with stride Co (epilogue_t).
// The pixels past the last full panel: a panel of NR is computed for any tail, so a 7x7 map (49
// pixels = 32 + 17) computed 64 (EfficientNet's late stages at batch 1). A tail of more than L
// pixels but at most L + kDotPixels runs as a half panel (one vector of L pixels) plus dot
// products; a tail of at most kDotPixels as dot products only; anything else as a full panel.
constexpr int64_t kDotPixels = 4;
struct PwtTail {
  int64_t full_panels, half, dots;  // half: 0 or L pixels in a half panel; dots: pixels by dots
};
template <class G>
PwtTail pwt_tail(int64_t M) {
  const int64_t q = M / G::NR, t = M - q * G::NR;
  if (t == 0) return {q, 0, 0};
  if (t <= kDotPixels) return {q, 0, t};
  if (t > G::L && t <= G::L + kDotPixels) return {q, G::L, t - G::L};
  return {q + 1, 0, 0};  // a full panel for the tail, as before
}

template <Isa I, class T>
EFFOPS_INLINE void pwt_task_body(const PwArgs<T>& a, int64_t task) {
  using F = Acc<T>;
  using G = typename TileFor<F, I>::type;
  using H = HalfTile<G>;
  const int64_t nblk = (a.Co + G::MR - 1) / G::MR;
  const int64_t b0 = task * a.bpt, b1 = std::min(nblk, b0 + a.bpt);
  if (b0 >= b1) return;
  const PwtTail tl = pwt_tail<G>(a.M);
  alignas(64) F tile[G::MR * G::NR];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t co0 = b * G::MR;
    const int mr = static_cast<int>(std::min<int64_t>(G::MR, a.Co - co0));
    for (int64_t q = 0; q < tl.full_panels; ++q) {
      const int64_t m0 = q * G::NR, jn = std::min<int64_t>(G::NR, a.M - m0);
      micro<I>(mr, a.w + co0 * a.C, a.C, 1, a.apt + q * a.C * G::NR, a.C, tile);
      with_epilogue_act(a.act, [&](auto A) EFFOPS_LAMBDA_INLINE {
        epilogue_t<G, A()>(tile, mr, co0, jn, a.Co, a.scale, a.bias, a.res ? a.res + m0 * a.Co : nullptr,
                           a.out + m0 * a.Co, a.act);
      });
    }
    if (tl.half) {
      const int64_t m0 = tl.full_panels * G::NR;
      micro<I, true>(mr, a.w + co0 * a.C, a.C, 1, a.apt + tl.full_panels * a.C * G::NR, a.C, tile);
      with_epilogue_act(a.act, [&](auto A) EFFOPS_LAMBDA_INLINE {
        epilogue_t<H, A()>(tile, mr, co0, tl.half, a.Co, a.scale, a.bias, a.res ? a.res + m0 * a.Co : nullptr,
                           a.out + m0 * a.Co, a.act);
      });
    }
  }
  if (!tl.dots) return;
  // The last pixels: out[m, co] = dot(w[co, :], pixel m) for this task's channels, the pixel read
  // back from its packed panel (SE scale applied and converted there, as for the panels).
  using V = typename G::V;
  constexpr int64_t L = G::L;
  thread_local std::vector<F> row;
  row.resize(static_cast<size_t>(a.C));
  const int64_t co_end = std::min(a.Co, b1 * G::MR);
  for (int64_t m = a.M - tl.dots; m < a.M; ++m) {
    const F* panel = a.apt + (m / G::NR) * a.C * G::NR + m % G::NR;
    for (int64_t k = 0; k < a.C; ++k) row[k] = panel[k * G::NR];
    const T* res = a.res ? a.res + m * a.Co : nullptr;
    T* out = a.out + m * a.Co;
    const int64_t CL = a.C / L * L;
    for (int64_t co = b0 * G::MR; co < co_end; ++co) {
      const F* w = a.w + co * a.C;
      V acc = G::splat(F(0));
      for (int64_t k = 0; k < CL; k += L) acc += G::load(w + k) * G::load(row.data() + k);
      F s = F(0);
      for (int64_t l = 0; l < L; ++l) s += acc[l];
      for (int64_t k = CL; k < a.C; ++k) s += w[k] * row[k];
      if (a.scale) s *= a.scale[co];
      if (a.bias) s += a.bias[co];
      s = simd::act_s(s, a.act);
      if (res) s += simd::to_f(res[co]);
      simd::store_s(out + co, s);
    }
  }
}

// ---------------------------------------------------------------- fused depthwise-separable
template <class T>
struct DwsepArgs {
  const T* x;
  const Acc<T>* taps;
  const Acc<T>* bp;
  const Acc<T>* dw_scale;
  const Acc<T>* dw_bias;
  const Acc<T>* pw_scale;
  const Acc<T>* pw_bias;
  const T* res;
  ConvGeom g;
  int64_t Co;
  int act, pw_act;
  bool preact;
  T* out;
  int64_t P;          // pixels per depthwise tile
  int64_t rpt, blocks;  // output rows per task, tasks per image
  const uint16_t* bpb = nullptr;  // bf16-pair weight panels: the vdpbf16ps GEMM (gemm_bf16.h)
};

template <Isa I, class T>
EFFOPS_INLINE void dwsep_task_body(const DwsepArgs<T>& a, int64_t task) {
  using F = Acc<T>;
  const ConvGeom& g = a.g;
  const int64_t n = task / a.blocks, oh0 = (task % a.blocks) * a.rpt;
  const int64_t oh1 = std::min(g.Ho, oh0 + a.rpt);
  thread_local std::vector<F> dbuf, ap, band;
  dbuf.resize(static_cast<size_t>(a.P * g.C));
  const T* xn = a.x + n * g.H * g.W * g.C;
  int64_t ih0 = 0, ih1 = 0;
  if (a.preact) {  // activate the input rows of the whole block once
    band_of(g, oh0, oh1, ih0, ih1);
    with_act(a.act, [&](auto IA) EFFOPS_LAMBDA_INLINE { activate_band<simd::vec_bytes<I>, T, F, IA()>(xn, g, ih0, ih1, band); });
  }
  // Pixels [oh0 * Wo, oh1 * Wo) of the image in chunks of P, a chunk crossing row ends where it
  // must (NHWC pixels are contiguous): the GEMM gets full MR-row tiles also on narrow maps
  // (at 14 or 7 pixels per row, row-sized chunks left most of the second tile empty).
  const int64_t p_end = oh1 * g.Wo;
  for (int64_t p0 = oh0 * g.Wo; p0 < p_end; p0 += a.P) {
    const int64_t p1 = std::min(p_end, p0 + a.P);
    for (int64_t p = p0; p < p1;) {  // the depthwise stage, one row segment at a time
      const int64_t oh = p / g.Wo, ow0 = p % g.Wo, ow1 = std::min(g.Wo, ow0 + (p1 - p));
      F* d = dbuf.data() + (p - p0) * g.C;
      if (a.preact) {
        const F* frows[64];
        tap_rows<F>(g, oh, band.data(), ih0, frows);
        dw_row<simd::vec_bytes<I>>(g, frows, a.taps, a.dw_scale, a.dw_bias, simd::kNone, ow0, ow1, d,
                                   static_cast<F*>(nullptr));
      } else {
        const T* trows[64];
        const T* pf[2];
        tap_rows<T>(g, oh, xn, 0, trows);
        next_rows(g, oh, xn, pf);
        dw_row<simd::vec_bytes<I>>(g, trows, a.taps, a.dw_scale, a.dw_bias, a.act, ow0, ow1, d,
                                   static_cast<F*>(nullptr), pf);
      }
      p += ow1 - ow0;
    }
    const int64_t o = (n * g.Ho * g.Wo + p0) * a.Co;
#if EFFOPS_HAS_BF16DOT
    if constexpr (I == kV4 && std::is_same<T, simd::bf16>::value) {
      if (a.bpb) {
        thread_local std::vector<uint16_t> apb;
        gemm_rows_bf16dot(dbuf.data(), g.C, 0, p1 - p0, g.C, static_cast<const F*>(nullptr), 1, a.bpb, a.Co,
                          a.pw_scale, a.pw_bias, a.pw_act, a.res ? a.res + o : nullptr, a.out + o, a.Co, apb);
        continue;
      }
    }
#endif
    gemm_rows<I>(dbuf.data(), g.C, 0, p1 - p0, g.C, static_cast<const F*>(nullptr), 1, a.bp, a.Co,
                 a.pw_scale, a.pw_bias, a.pw_act, a.res ? a.res + o : nullptr, a.out + o, a.Co, ap);
  }
}

// ---------------------------------------------------------------- per-ISA entry points
#define EFFOPS_DEFINE_TASKS(T, F)                                                               \
  EFFOPS_TARGET_V4 void pw_task_v4(const PwArgs<T>& a, int64_t t) {                            \
    pw_task_body<kV4>(a, t);                                                 \
  }                                                                                            \
  EFFOPS_TARGET_V3 void pw_task_v3(const PwArgs<T>& a, int64_t t) {                            \
    pw_task_body<kV3>(a, t);                                                 \
  }                                                                                            \
  void pw_task_base(const PwArgs<T>& a, int64_t t) { pw_task_body<kBase>(a, t); } \
  EFFOPS_TARGET_V4 void pwt_task_v4(const PwArgs<T>& a, int64_t t) { pwt_task_body<kV4>(a, t); } \
  EFFOPS_TARGET_V3 void pwt_task_v3(const PwArgs<T>& a, int64_t t) { pwt_task_body<kV3>(a, t); } \
  void pwt_task_base(const PwArgs<T>& a, int64_t t) { pwt_task_body<kBase>(a, t); }              \
  EFFOPS_TARGET_V4 void dwsep_task_v4(const DwsepArgs<T>& a, int64_t t) {                      \
    dwsep_task_body<kV4>(a, t);                                              \
  }                                                                                            \
  EFFOPS_TARGET_V3 void dwsep_task_v3(const DwsepArgs<T>& a, int64_t t) {                      \
    dwsep_task_body<kV3>(a, t);                                              \
  }                                                                                            \
  void dwsep_task_base(const DwsepArgs<T>& a, int64_t t) {                                     \
    dwsep_task_body<kBase>(a, t);                                            \
  }
EFFOPS_DEFINE_TASKS(float, float)
EFFOPS_DEFINE_TASKS(simd::bf16, float)
#undef EFFOPS_DEFINE_TASKS
// float64 at the baseline level only: it exists for gradcheck and tests, never hot, and copies
// per level would only cost compile time (pw_forward / dwsep_forward never pick another level).
void pw_task_base(const PwArgs<double>& a, int64_t t) { pw_task_body<kBase>(a, t); }
void pwt_task_base(const PwArgs<double>& a, int64_t t) { pwt_task_body<kBase>(a, t); }
void dwsep_task_base(const DwsepArgs<double>& a, int64_t t) { dwsep_task_body<kBase>(a, t); }

// bf16 storage at the AVX-512 level on a CPU with AVX512_BF16: the vdpbf16ps GEMM.
template <Isa I, class T>
bool use_bf16dot() {
  if constexpr (I == kV4 && std::is_same<T, simd::bf16>::value) return cpu_has_bf16dot();
  return false;
}

// fn_v4 / fn_v3 / fn_base (the per-ISA copies of one task body) for the level I a driver runs at.
#define EFFOPS_AT_ISA(I, fn, ...)                                     \
  do {                                                                \
    if constexpr (I == kV4)                                           \
      fn##_v4(__VA_ARGS__);                                           \
    else if constexpr (I == kV3)                                      \
      fn##_v3(__VA_ARGS__);                                           \
    else                                                              \
      fn##_base(__VA_ARGS__);                                         \
  } while (0)

#if EFFOPS_X86
// 16 x 16 floats transposed in registers: row j of the result is column j of r.
EFFOPS_TARGET_V4 EFFOPS_INLINE void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = (__m512)_mm512_unpacklo_pd((__m512d)t[i], (__m512d)t[i + 2]);
    r[i + 1] = (__m512)_mm512_unpackhi_pd((__m512d)t[i], (__m512d)t[i + 2]);
    r[i + 2] = (__m512)_mm512_unpacklo_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
    r[i + 3] = (__m512)_mm512_unpackhi_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// 8 x 8 floats transposed in registers (AVX2): row j of the result is column j of r.
EFFOPS_TARGET_V3 EFFOPS_INLINE void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// The register transpose of the level whose float vectors are V (L lanes): r[j] becomes column j.
EFFOPS_TARGET_V4 inline void transpose_lanes(typename simd::Traits<float, 64>::V (&r)[16]) {
  transpose16(reinterpret_cast<__m512*>(r));
}
EFFOPS_TARGET_V3 inline void transpose_lanes(typename simd::Traits<float, 32>::V (&r)[8]) {
  transpose8(reinterpret_cast<__m256*>(r));
}

// pack_panels for the float tile of the level with W-byte vectors (AVX-512: NR = 32 = 2 x 16
// lanes; AVX2: NR = 16 = 2 x 8), panel p: blocks of L k's of a whole panel as two L x L
// transposes in registers (the SE scale applied to the loaded rows, or to the transposed k rows
// for a per-k scale), the K tail element by element, a panel past Co by pack_panels. The same
// values as pack_panels (each element converted and multiplied once, as there), several times
// fewer cycles: pack_panels, compiled at the baseline level, moved one element at a time; at
// batch 1 the weights packed per call were 8% of tf_efficientnet_b3's forward (AVX-512).
template <int W, class S>
EFFOPS_INLINE void pack_panels_tr(const S* w, int64_t Co, int64_t K, int64_t p, float* bp, const float* cs,
                                  int64_t cs_hw) {
  using G = typename TileFor<float, W == 64 ? kV4 : kV3>::type;
  using V = typename simd::Traits<float, W>::V;
  constexpr int64_t L = simd::Traits<float, W>::L, NR = G::NR;
  static_assert(NR == 2 * L, "two L x L transposes per block of a panel");
  if ((p + 1) * NR > Co) return pack_panels<G>(w, Co, K, p, p + 1, bp, cs, cs_hw);
  float* dst = bp + p * K * NR;
  const int64_t KB = K / L * L;
  for (int64_t k0 = 0; k0 < KB; k0 += L) {
    for (int64_t h = 0; h < 2; ++h) {
      V r[L];
      for (int64_t i = 0; i < L; ++i) {
        const int64_t j = p * NR + h * L + i;
        r[i] = simd::loadv<V>(w + j * K + k0);
        if (cs && cs_hw) r[i] = r[i] * simd::loadv<V>(cs + (j / cs_hw) * K + k0);
      }
      transpose_lanes(r);
      for (int64_t kk = 0; kk < L; ++kk)
        simd::storev(dst + (k0 + kk) * NR + h * L, cs && !cs_hw ? r[kk] * cs[k0 + kk] : r[kk]);
    }
  }
  for (int64_t j = 0; j < NR && KB < K; ++j) {
    const S* src = w + (p * NR + j) * K;
    const float* c = cs ? cs + (cs_hw ? ((p * NR + j) / cs_hw) * K : 0) : nullptr;
    for (int64_t k = KB; k < K; ++k) dst[k * NR + j] = c ? simd::to_f(src[k]) * c[k] : simd::to_f(src[k]);
  }
}
template <class S>
EFFOPS_TARGET_V4 void pack_panels_v4(const S* w, int64_t Co, int64_t K, int64_t p, float* bp, const float* cs,
                                     int64_t cs_hw) {
  pack_panels_tr<64>(w, Co, K, p, bp, cs, cs_hw);
}
template <class S>
EFFOPS_TARGET_V3 void pack_panels_v3(const S* w, int64_t Co, int64_t K, int64_t p, float* bp, const float* cs,
                                     int64_t cs_hw) {
  pack_panels_tr<32>(w, Co, K, p, bp, cs, cs_hw);
}
#endif

// Panels of NR rows of src [rows][K] (pack_panels, SE scale cs / cs_hw as there) packed by the
// threads together into buf, a buffer of the calling thread reused from call to call (a fresh
// one page-faulted on every call); below ~64k elements one thread packs faster than a parallel
// region starts. Returns buf's data.
template <class G, class S, class F>
F* pack_parallel(const S* src, int64_t rows, int64_t K, int threads, std::vector<F>& buf,
                 const F* cs = nullptr, int64_t cs_hw = 0) {
  const int64_t panels = (rows + G::NR - 1) / G::NR;
  buf.resize(static_cast<size_t>(panels * K * G::NR));
  F* d = buf.data();
  const int workers = rows * K < (int64_t(1) << 16) ? 1 : max_workers(panels, threads);
#if EFFOPS_X86
  if constexpr (std::is_same<G, typename TileFor<float, kV4>::type>::value && std::is_same<F, float>::value) {
    parallel_for(panels, workers, [&](int64_t p, int) { pack_panels_v4(src, rows, K, p, d, cs, cs_hw); });
    return d;
  }
  if constexpr (std::is_same<G, typename TileFor<float, kV3>::type>::value && std::is_same<F, float>::value) {
    parallel_for(panels, workers, [&](int64_t p, int) { pack_panels_v3(src, rows, K, p, d, cs, cs_hw); });
    return d;
  }
#endif
  parallel_for(panels, workers, [&](int64_t p, int) { pack_panels<G>(src, rows, K, p, p + 1, d, cs, cs_hw); });
  return d;
}

// The GEMM weights of every call, packed into the panels of the tile of ISA I (or the bf16 pairs
// of the vdpbf16ps GEMM) by the threads together: at batch 1 a fresh buffer and a one-thread pack
// were over half the time of EfficientNet's late 1x1 convs (K = 1152, 49 pixels). The weights are
// packed on every call, not cached: the parameters they come from may have been written in place
// (cached copies would need a check that reads them all anyway).
// k2p > 0: bf16 panels of k2p pairs (the AMX GEMM's whole chunks).
template <Isa I, class T>
void pack_gemm_weights(const Acc<T>* w, int64_t Co, int64_t K, int threads, const Acc<T>*& bp,
                       const uint16_t*& bpb, const Acc<T>* cs = nullptr, int64_t k2p = 0) {
  using F = Acc<T>;
  using G = typename TileFor<F, I>::type;
  if (use_bf16dot<I, T>()) {
    const int64_t panels = (Co + kBfNR - 1) / kBfNR, pairs = std::max<int64_t>(k2p, (K + 1) / 2);
    const int workers = K * Co < (int64_t(1) << 16) ? 1 : max_workers(panels, threads);
    thread_local std::vector<uint16_t> buf;
    buf.resize(static_cast<size_t>(panels * pairs * kBfNR * 2));
    uint16_t* d = buf.data();
    parallel_for(panels, workers, [&](int64_t p, int) { pack_panels_bf16(w, Co, K, p, p + 1, d, cs, pairs); });
    bpb = d, bp = nullptr;
  } else {
    thread_local std::vector<F> buf;
    bp = pack_parallel<G>(w, Co, K, threads, buf, cs), bpb = nullptr;
  }
}

template <Isa I, class T>
void pw_launch(PwArgs<T> a, int threads);

// pw_run takes the transposed GEMM (below).
template <class T>
bool transposed_gemm(const PwArgs<T>& a) {
  return a.Co * a.C > a.M * (a.C + a.Co) && a.M * a.C * int64_t(sizeof(Acc<T>)) <= (int64_t(512) << 10);
}

template <Isa I, class T>
void pw_run(PwArgs<T> a, const Acc<T>* w, int threads) {
  using F = Acc<T>;
  using G = typename TileFor<F, I>::type;
  // The transposed GEMM packs the pixels (M * C) instead of the weights (Co * C) but stores the
  // output with stride Co (M * Co scattered stores): taken where that is less work and the
  // pixels' panels are L2-sized (at batch 1: 1152 -> 192 at 7x7 202 -> 151 us, 320 -> 1280 342 ->
  // 254 us, one thread; 112 -> 672 at 14x14, with its 131k scattered stores, stays packed).
  // bf16 too (float weights, bf16 pixels widened while packed, float FMAs): at these sizes the
  // GEMM waits on memory, and the vdpbf16ps path would first round all the weights to bf16 pairs.
  if (transposed_gemm(a)) {
    thread_local std::vector<F> buf;
    a.apt = pack_parallel<G>(a.y, a.M, a.C, threads, buf, a.cs, a.HW), a.w = w;
    const int64_t nblk = (a.Co + G::MR - 1) / G::MR;
    a.bpt = std::max<int64_t>(1, (nblk + 4 * threads - 1) / (4 * threads));
    const int64_t tasks = (nblk + a.bpt - 1) / a.bpt;
    parallel_for(tasks, threads, [&](int64_t t, int) {
      EFFOPS_AT_ISA(I, pwt_task, a, t);
    });
    return;
  }
  // One image: its SE channel scale goes into the weights (packed anyway), so the rows of A need
  // no packing pass (at batch 1 that pass cost about as much as the GEMM of a late 1x1 conv).
  const F* cs_w = a.cs && a.M == a.HW ? a.cs : nullptr;
  if (use_bf16dot<I, T>() && ::effops::amx()) a.k2p = amx::panel_pairs(a.C);
  pack_gemm_weights<I, T>(w, a.Co, a.C, threads, a.bp, a.bpb, cs_w, a.k2p);
  if (cs_w) a.cs = nullptr;
  pw_launch<I>(a, threads);
}

// The packed-weight GEMM's tasks (weights in a.bp or a.bpb).
template <Isa I, class T>
void pw_launch(PwArgs<T> a, int threads) {
  using F = Acc<T>;
  using G = typename TileFor<F, I>::type;
  std::vector<F> scale, bias;
  const bool tiles = a.k2p > 0;
  pad_channels<G>(a.scale, a.Co, scale);
  pad_channels<G>(a.bias, a.Co, bias);
  a.scale = a.scale ? scale.data() : nullptr;
  a.bias = a.bias ? bias.data() : nullptr;
  // ~8 microkernel tiles of rows per task (AMX: whole 32-row blocks, up to 8)
  const int64_t mr = tiles ? int64_t(amx::kRows) : int64_t(G::MR);
  a.rpt = std::max<int64_t>(mr, std::min<int64_t>(8 * mr, (a.M + 4 * threads - 1) / (4 * threads)));
  if (tiles) a.rpt = (a.rpt + mr - 1) / mr * mr;
  const int64_t row_tasks = (a.M + a.rpt - 1) / a.rpt;
  // Few rows (batch 1, 7x7 or 14x14 maps: 5-17 row tiles): the output channels are split too, so
  // the threads get enough tasks to balance (5 tasks on 2 threads left one idle a fifth of the time).
  const int64_t nr = a.bpb ? int64_t(kBfNR) : int64_t(G::NR), panels = (a.Co + nr - 1) / nr;
  if (threads > 1 && row_tasks < 4 * threads && panels > 1) {
    const int64_t want = std::min(panels, (4 * threads + row_tasks - 1) / row_tasks);
    a.ppt = (panels + want - 1) / want;
    a.groups = (panels + a.ppt - 1) / a.ppt;
  }
  const int64_t tasks = row_tasks * a.groups;
  parallel_for(tasks, threads, [&](int64_t t, int) {
    EFFOPS_AT_ISA(I, pw_task, a, t);
  });
}

template <Isa I, class T>
void dwsep_run(DwsepArgs<T> a, const Acc<T>* pw, int threads) {
  using F = Acc<T>;
  using G = typename TileFor<F, I>::type;
  std::vector<F> scale, bias;
  pack_gemm_weights<I, T>(pw, a.Co, a.g.C, threads, a.bp, a.bpb);
  pad_channels<G>(a.pw_scale, a.Co, scale);
  pad_channels<G>(a.pw_bias, a.Co, bias);
  a.pw_scale = a.pw_scale ? scale.data() : nullptr;
  a.pw_bias = a.pw_bias ? bias.data() : nullptr;
  a.P = 4 * G::MR;
  // Row blocks: enough tasks for the threads; in pre-activation mode longer blocks also mean
  // fewer input rows activated twice (once per block they overlap).
  const int64_t want = std::max<int64_t>(1, 4 * threads);
  const int64_t per_image = a.g.N > 0 ? std::max<int64_t>(1, (want + a.g.N - 1) / a.g.N) : 1;  // N = 0: no tasks
  a.rpt = std::max<int64_t>(1, (a.g.Ho + per_image - 1) / per_image);
  a.blocks = (a.g.Ho + a.rpt - 1) / a.rpt;
  parallel_for(a.g.N * a.blocks, threads, [&](int64_t t, int) {
    EFFOPS_AT_ISA(I, dwsep_task, a, t);
  });
}

}  // namespace

template <class T>
void pw_forward(const T* y, const Acc<T>* w, const Acc<T>* cs, const Acc<T>* scale,
                const Acc<T>* bias, int act, const T* res, T* out, int64_t N, int64_t HW,
                int64_t C, int64_t Co, int threads) {
  PwArgs<T> a{y, nullptr, cs, scale, bias, act, res, out, HW, C, Co, N * HW, 0};
  if (a.M == 0 || Co == 0) return;
  threads = threads_for(double(a.M) * C * Co, threads);
  if constexpr (!std::is_same<T, double>::value) {
    switch (cpu_isa()) {
      case kV4:
        return pw_run<kV4>(a, w, threads);
      case kV3:
        return pw_run<kV3>(a, w, threads);
      default:
        break;
    }
  }
  return pw_run<kBase>(a, w, threads);
}

bool bf16dot_cpu() {
#if EFFOPS_HAS_BF16DOT
  return cpu_has_bf16dot();
#else
  return false;
#endif
}

#if EFFOPS_HAS_BF16DOT
namespace {
// The packed panels' pairs per panel: the AMX GEMM's whole chunks, or the vdpbf16ps GEMM's ceil(C / 2).
int64_t panel_pairs_of(bool amx, int64_t C) {
#if EFFOPS_HAS_AMX
  if (amx) return amx::panel_pairs(C);
#endif
  return (C + 1) / 2;
}
// The GEMM of the panels can run now: the AMX kernels on (amx), or AVX-512 with AVX512_BF16.
bool panels_runnable(bool amx) {
#if EFFOPS_HAS_AMX
  if (amx) return ::effops::amx();
#endif
  return !amx && cpu_isa() == kV4 && use_bf16dot<kV4, simd::bf16>();
}
}  // namespace
#endif

std::vector<uint16_t> pack_pw_bf16(bool amx, const float* w, int64_t Co, int64_t C) {
  std::vector<uint16_t> panels;
#if EFFOPS_HAS_BF16DOT
  if (!(amx ? ::effops::amx() : cpu_has_bf16dot())) return panels;
  const int64_t np = (Co + kBfNR - 1) / kBfNR, pairs = panel_pairs_of(amx, C);
  panels.resize(static_cast<size_t>(np * pairs * kBfNR * 2));
  pack_panels_bf16(w, Co, C, 0, np, panels.data(), static_cast<const float*>(nullptr), pairs);
#else
  (void)amx, (void)w, (void)Co, (void)C;
#endif
  return panels;
}

bool pw_forward_bf16(bool amx, const simd::bf16* y, const uint16_t* panels, const float* cs, const float* scale,
                     const float* bias, int act, const simd::bf16* res, simd::bf16* out, int64_t N, int64_t HW,
                     int64_t C, int64_t Co, int threads) {
#if EFFOPS_HAS_BF16DOT
  PwArgs<simd::bf16> a{y, nullptr, cs, scale, bias, act, res, out, HW, C, Co, N * HW, 0};
  // (the vdpbf16ps panels leave the small-M shapes to pw_forward's transposed GEMM)
  if (!panels_runnable(amx) || (!amx && transposed_gemm(a))) return false;
  if (a.M == 0 || Co == 0) return true;
  a.bpb = panels;
  if (amx) a.k2p = panel_pairs_of(true, C);
  pw_launch<kV4>(a, threads_for(double(a.M) * C * Co, threads));
  return true;
#else
  (void)amx, (void)y, (void)panels, (void)cs, (void)scale, (void)bias, (void)act, (void)res, (void)out, (void)N;
  (void)HW, (void)C, (void)Co, (void)threads;
  return false;
#endif
}

template <class T>
void dwsep_forward(const T* x, const Acc<T>* taps, const Acc<T>* pw, const Acc<T>* dw_scale,
                   const Acc<T>* dw_bias, const Acc<T>* pw_scale, const Acc<T>* pw_bias,
                   const T* res, const ConvGeom& g, int64_t Co, int act, int pw_act, bool preact,
                   T* out, int threads) {
  if (g.KH > 64 || g.KW > 64) throw std::invalid_argument("depthwise kernels larger than 64x64 are not supported");
  DwsepArgs<T> a{x, taps, nullptr, dw_scale, dw_bias, pw_scale, pw_bias, res, g, Co, act, pw_act,
                 preact, out, 0, 0, 0};
  if (g.N * g.Ho * g.Wo == 0 || Co == 0) return;
  threads = threads_for(double(g.N) * g.Ho * g.Wo * g.C * (g.KH * g.KW + Co), threads);
  if constexpr (!std::is_same<T, double>::value) {
    switch (cpu_isa()) {
      case kV4:
        return dwsep_run<kV4>(a, pw, threads);
      case kV3:
        return dwsep_run<kV3>(a, pw, threads);
      default:
        break;
    }
  }
  return dwsep_run<kBase>(a, pw, threads);
}

#define EFFOPS_INSTANTIATE(T)                                                                   \
  template void pw_forward<T>(const T*, const Acc<T>*, const Acc<T>*, const Acc<T>*,           \
                              const Acc<T>*, int, const T*, T*, int64_t, int64_t, int64_t,     \
                              int64_t, int);                                                   \
  template void dwsep_forward<T>(const T*, const Acc<T>*, const Acc<T>*, const Acc<T>*,        \
                                 const Acc<T>*, const Acc<T>*, const Acc<T>*, const T*,        \
                                 const ConvGeom&, int64_t, int, int, bool, T*, int);
EFFOPS_INSTANTIATE(float)
EFFOPS_INSTANTIATE(double)
EFFOPS_INSTANTIATE(simd::bf16)

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case kV4: return "x86-64-v4 (AVX-512)";
    case kV3: return "x86-64-v3 (AVX2+FMA)";
    default: return "baseline";
  }
}

}  // namespace effops::dwsep
