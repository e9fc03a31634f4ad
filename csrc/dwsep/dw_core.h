// Core of the depthwise convolution, shared by the standalone depthwise kernel and the fused
// depthwise-separable kernel: the row kernel (out of line, one copy per ISA level: see dw_row
// below and dw_row_impl.h) and the inline helpers around it (tap rows, prefetch rows, bands).
#pragma once
#include <algorithm>
#include <type_traits>
#include <vector>

#include "dwsep/conv.h"
#include "dwsep/simd.h"

namespace effops::dwsep {

using simd::act_s;
using simd::act_v;
using simd::loadv;
using simd::storev;
using simd::to_f;

template <int A>
using ActC = std::integral_constant<int, A>;

// Calls f(ActC<act>{}) so the activation is a compile-time constant inside hot loops.
template <class Fn>
EFFOPS_INLINE void with_act(int act, Fn&& f) {
  switch (act) {
    case simd::kRelu:
      return f(ActC<simd::kRelu>{});
    case simd::kRelu6:
      return f(ActC<simd::kRelu6>{});
    case simd::kSilu:
      return f(ActC<simd::kSilu>{});
    case simd::kHardswish:
      return f(ActC<simd::kHardswish>{});
    case simd::kSigmoid:
      return f(ActC<simd::kSigmoid>{});
    default:
      return f(ActC<simd::kNone>{});
  }
}

// For GEMM epilogues: none (the projection convs) and silu (its exp is most of the epilogue) as
// compile-time constants, every other activation as the run-time switch of simd::act_v (f gets
// ActC<kActRuntime> and passes the code along): one predictable branch per vector of a tile
// that took K multiply-adds, where each compile-time activation was another copy of the GEMM.
template <class Fn>
EFFOPS_INLINE void with_epilogue_act(int act, Fn&& f) {
  if (act == simd::kNone) return f(ActC<simd::kNone>{});
  if (act == simd::kSilu) return f(ActC<simd::kSilu>{});
  return f(ActC<simd::kActRuntime>{});
}

// The depthwise row kernel: output pixels [ow0, ow1) of one output row, every channel (see
// dw_row_impl.h). rows[kh] points at the input row (W x C elements) tap row kh reads, or is null
// where that row is padding; the result for pixel ow goes to out + (ow - ow0) * C; sums (may be
// null) accumulates the stored values per channel; pf: up to 2 input rows to prefetch while
// computing (next_rows), null entries for none. One out-of-line copy per ISA level, each in its
// own translation unit (dw_rows_v4.cpp, dw_rows_v3.cpp, dw_rows_base.cpp), instantiated for the
// (input, output, accumulator) types the kernels use: (float, float), (bf16, bf16),
// (float, bf16), (bf16, float), all with float accumulators, and (double, double) at the
// baseline level only (float64 exists for gradcheck and tests, never hot).
#define EFFOPS_DW_ROW_DECL(NAME, TARGET)                                                        \
  template <class S, class O, class F>                                                         \
  TARGET void NAME(const ConvGeom& g, const S* const* rows, const F* taps, const F* scale,     \
                   const F* bias, int act, int64_t ow0, int64_t ow1, O* out, F* sums,          \
                   const S* const* pf);
EFFOPS_DW_ROW_DECL(dw_row_base, )
#if EFFOPS_X86
EFFOPS_DW_ROW_DECL(dw_row_v4, EFFOPS_TARGET_V4)
EFFOPS_DW_ROW_DECL(dw_row_v3, EFFOPS_TARGET_V3)
#if EFFOPS_HAS_BF16_TARGET
EFFOPS_DW_ROW_DECL(dw_row_v4bf, EFFOPS_TARGET_BF16)  // bf16 outputs on CPUs with AVX512_BF16 (dw_rows_v4bf.cpp)
#endif
#endif
#undef EFFOPS_DW_ROW_DECL

// The row kernel of the level whose vector width is W bytes (64 AVX-512, 32 AVX2, 16 baseline);
// float64 always runs the baseline copy.
template <int W, class S, class O, class F>
EFFOPS_INLINE void dw_row(const ConvGeom& g, const S* const* rows, const F* taps, const F* scale,
                          const F* bias, int act, int64_t ow0, int64_t ow1, O* out, F* sums,
                          const S* const* pf = nullptr) {
#if EFFOPS_X86
  if constexpr (!std::is_same<F, double>::value && W == 64) {
#if EFFOPS_HAS_BF16_TARGET
    if constexpr (std::is_same<O, simd::bf16>::value && std::is_same<F, float>::value)
      if (bf16dot_cpu()) return dw_row_v4bf(g, rows, taps, scale, bias, act, ow0, ow1, out, sums, pf);
#endif
    return dw_row_v4(g, rows, taps, scale, bias, act, ow0, ow1, out, sums, pf);
  }
  else if constexpr (!std::is_same<F, double>::value && W == 32)
    return dw_row_v3(g, rows, taps, scale, bias, act, ow0, ow1, out, sums, pf);
  else
#endif
    return dw_row_base(g, rows, taps, scale, bias, act, ow0, ow1, out, sums, pf);
}

// Input rows [ih0, ih1) of image n, activated (in_act) into a float buffer: the input of the
// depthwise conv in pre-activation mode, computed once per band instead of once per tap.
template <int W, class T, class F, int ACT>
EFFOPS_INLINE void activate_band(const T* x_n, const ConvGeom& g, int64_t ih0, int64_t ih1,
                                 std::vector<F>& band) {
  using V = typename simd::Traits<F, W>::V;
  constexpr int64_t L = simd::Traits<F, W>::L;
  const int64_t n = std::max<int64_t>(0, ih1 - ih0) * g.W * g.C;
  band.resize(static_cast<size_t>(n));
  const T* src = x_n + ih0 * g.W * g.C;
  int64_t i = 0;
  for (; i + L <= n; i += L) storev(band.data() + i, act_v(loadv<V>(src + i), ACT));
  for (; i < n; ++i) band[i] = act_s(to_f(src[i]), ACT);
}

// Row pointers of output row oh: rows[kh] = input row oh*sh - pt + kh*dh of the source, where
// the source holds rows [src_ih0, ...) of one image, or null outside the input.
template <class S>
EFFOPS_INLINE void tap_rows(const ConvGeom& g, int64_t oh, const S* src, int64_t src_ih0,
                            const S** rows) {
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    const int64_t ih = oh * g.sh - g.pt + kh * g.dh;
    rows[kh] = (ih < 0 || ih >= g.H) ? nullptr : src + (ih - src_ih0) * g.W * g.C;
  }
}

// The input rows that output row oh + 1 reads and row oh does not (the last min(sh, 2) tap rows
// of row oh + 1), in image x_n, or null outside the input: what dw_row prefetches.
template <class S>
EFFOPS_INLINE void next_rows(const ConvGeom& g, int64_t oh, const S* x_n, const S** pf) {
  for (int64_t r = 0; r < 2; ++r) {
    const int64_t ih = (oh + 1) * g.sh - g.pt + (g.KH - 1) * g.dh - r;
    const bool fresh = r < g.sh && oh + 1 < g.Ho;
    pf[r] = (fresh && ih >= 0 && ih < g.H) ? x_n + ih * g.W * g.C : nullptr;
  }
}

// The input rows output rows [oh0, oh1) read, clipped to the image.
EFFOPS_INLINE void band_of(const ConvGeom& g, int64_t oh0, int64_t oh1, int64_t& ih0,
                           int64_t& ih1) {
  ih0 = std::max<int64_t>(0, oh0 * g.sh - g.pt);
  ih1 = std::min<int64_t>(g.H, (oh1 - 1) * g.sh - g.pt + (g.KH - 1) * g.dh + 1);
  if (ih1 < ih0) ih1 = ih0;
}

}  // namespace effops::dwsep
