// Inline core of the depthwise convolution, shared by the standalone depthwise kernel and the
// fused depthwise-separable kernel (each compiled per ISA by its caller).
//
// One output row segment at a time: for each output pixel and each block of 16 (float) or 8
// (double) channels, the taps accumulate in one vector register; the epilogue applies the
// per-channel affine and the activation and stores. Padding never materialises: taps that fall
// outside the input are skipped (TensorFlow 'same' padding is just asymmetric pt/pb, pl/pr).
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

// The epilogue of one vector of channels: affine, activation (ACT, a compile-time code),
// store; returns the stored value (for the channel sums).
template <int ACT, class V, class F, class O>
EFFOPS_INLINE V dw_finish(V acc, int64_t c, const F* scale, const F* bias, O* o) {
  if (scale) acc = acc * loadv<V>(scale + c);
  if (bias) acc = acc + loadv<V>(bias + c);
  acc = act_v(acc, ACT);
  storev(o + c, acc);
  return acc;
}

// One output pixel, with bounds checks on every tap (border pixels; the channel tail).
template <int W, int ACT, class S, class O, class F>
EFFOPS_INLINE void dw_pixel(const ConvGeom& g, const S* const* rows, const F* taps,
                            const F* scale, const F* bias, int64_t ow, int64_t c_begin,
                            O* o, F* sums) {
  using V = typename simd::Traits<F, W>::V;
  constexpr int64_t L = simd::Traits<F, W>::L;
  const int64_t C = g.C, CL = C / L * L, KH = g.KH, KW = g.KW;
  const int64_t iw0 = ow * g.sw - g.pl;
  int64_t c = c_begin;
  for (; c < CL; c += L) {
    V acc = simd::splat<V>(F(0));
    for (int64_t kh = 0; kh < KH; ++kh) {
      const S* r = rows[kh];
      if (!r) continue;
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t iw = iw0 + kw * g.dw;
        if (iw < 0 || iw >= g.W) continue;
        acc += loadv<V>(r + iw * C + c) * loadv<V>(taps + (kh * KW + kw) * C + c);
      }
    }
    acc = dw_finish<ACT>(acc, c, scale, bias, o);
    if (sums) storev(sums + c, loadv<V>(sums + c) + acc);
  }
  for (; c < C; ++c) {
    F acc = F(0);
    for (int64_t kh = 0; kh < KH; ++kh) {
      const S* r = rows[kh];
      if (!r) continue;
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t iw = iw0 + kw * g.dw;
        if (iw < 0 || iw >= g.W) continue;
        acc += to_f(r[iw * C + c]) * taps[(kh * KW + kw) * C + c];
      }
    }
    if (scale) acc *= scale[c];
    if (bias) acc += bias[c];
    acc = act_s(acc, ACT);
    simd::store_s(o + c, acc);
    if (sums) sums[c] += acc;
  }
}

// PB interior pixels ow, ow + 1, ... (every tap in bounds), full channel vectors: each tap's
// weights are loaded once for the PB pixels. KWC is the kernel width when known at compile
// time (3, 5, 7), else 0. The channel sums of the PB pixels are added up in registers and
// added to `sums` once (a load-add-store per pixel would chain through store forwarding).
template <int W, int PB, int KWC, int ACT, class S, class O, class F>
EFFOPS_INLINE void dw_interior(const ConvGeom& g, const S* const* rows, const F* taps,
                               const F* scale, const F* bias, int64_t ow, O* o, F* sums) {
  using V = typename simd::Traits<F, W>::V;
  constexpr int64_t L = simd::Traits<F, W>::L;
  const int64_t C = g.C, CL = C / L * L, KH = g.KH, KW = KWC ? KWC : g.KW;
  const int64_t step = g.sw * C, iw0 = ow * g.sw - g.pl;
  for (int64_t c = 0; c < CL; c += L) {
    V acc[PB];
#pragma GCC unroll 8
    for (int j = 0; j < PB; ++j) acc[j] = simd::splat<V>(F(0));
    for (int64_t kh = 0; kh < KH; ++kh) {
      const S* r = rows[kh];
      if (!r) continue;
      const F* t = taps + kh * KW * C + c;
      const S* p0 = r + iw0 * C + c;
#pragma GCC unroll 7
      for (int64_t kw = 0; kw < KW; ++kw) {
        const V w = loadv<V>(t + kw * C);
        const S* p = p0 + kw * g.dw * C;
#pragma GCC unroll 8
        for (int j = 0; j < PB; ++j) acc[j] += loadv<V>(p + j * step) * w;
      }
    }
    V total = simd::splat<V>(F(0));
#pragma GCC unroll 8
    for (int j = 0; j < PB; ++j) total += dw_finish<ACT>(acc[j], c, scale, bias, o + j * C);
    if (sums) storev(sums + c, loadv<V>(sums + c) + total);
  }
}

// Output pixels [ow0, ow1) of one output row. rows[kh] points at the input row (W x C elements)
// tap row kh reads, or is null where that row is padding. The result for pixel ow goes to
// out + (ow - ow0) * C. sums (may be null) accumulates the stored values per channel.
template <int W, int KWC, int ACT, class S, class O, class F>
EFFOPS_INLINE void dw_row_k(const ConvGeom& g, const S* const* rows, const F* taps,
                            const F* scale, const F* bias, int64_t ow0, int64_t ow1, O* out,
                            F* sums, const S* const* pf) {
  constexpr int64_t L = simd::Traits<F, W>::L;
  // 4 pixels x one vector of accumulators: 4 registers at every width (the 16-byte baseline
  // level has 16 xmm registers, AVX2 16 ymm, AVX-512 32 zmm).
  constexpr int PB = 4;
  const int64_t C = g.C, CL = C / L * L, KW = KWC ? KWC : g.KW;
  // interior pixels: ow * sw - pl >= 0 and ow * sw - pl + (KW - 1) * dw <= W - 1
  const int64_t span = (KW - 1) * g.dw;
  int64_t lo = (g.pl + g.sw - 1) / g.sw;
  int64_t hi = g.W - 1 - span + g.pl >= 0 ? (g.W - 1 - span + g.pl) / g.sw + 1 : 0;
  lo = std::min(std::max(lo, ow0), ow1);
  hi = std::min(std::max(hi, lo), ow1);
  for (int64_t ow = ow0; ow < lo; ++ow)
    dw_pixel<W, ACT>(g, rows, taps, scale, bias, ow, 0, out + (ow - ow0) * C, sums);
  int64_t ow = lo;
  // Software prefetch of the rows the next output row adds (pf, see next_rows), the part under
  // these pixels: large inputs stream from DRAM, and the hardware prefetcher, which stops at
  // every 4 KiB page, leaves the loads exposed once the activation lengthens the loop body.
  for (; ow + PB <= hi; ow += PB) {
    const int64_t iw = ow * g.sw - g.pl;  // >= 0 for interior pixels
    const int64_t pf_bytes = std::min<int64_t>(PB * g.sw, g.W - iw) * C * static_cast<int64_t>(sizeof(S));
    for (int r = 0; r < 2; ++r)
      if (pf[r]) {  // stays inside the row: no pointer past the input is formed
        const char* b = reinterpret_cast<const char*>(pf[r] + iw * C);
        for (int64_t i = 0; i < pf_bytes; i += 64) __builtin_prefetch(b + i, 0, 3);
      }
    dw_interior<W, PB, KWC, ACT>(g, rows, taps, scale, bias, ow, out + (ow - ow0) * C, sums);
  }
  for (; ow < hi; ++ow)
    dw_interior<W, 1, KWC, ACT>(g, rows, taps, scale, bias, ow, out + (ow - ow0) * C, sums);
  if (CL < C)  // channel tail of the interior pixels
    for (int64_t o2 = lo; o2 < hi; ++o2)
      dw_pixel<W, ACT>(g, rows, taps, scale, bias, o2, CL, out + (o2 - ow0) * C, sums);
  for (ow = hi; ow < ow1; ++ow)
    dw_pixel<W, ACT>(g, rows, taps, scale, bias, ow, 0, out + (ow - ow0) * C, sums);
}

// The activation a compile-time constant, the kernel width too for 3 and 5.
// pf: up to 2 input rows to prefetch while computing (next_rows), null entries for none.
template <int W, class S, class O, class F>
EFFOPS_INLINE void dw_row(const ConvGeom& g, const S* const* rows, const F* taps, const F* scale,
                          const F* bias, int act, int64_t ow0, int64_t ow1, O* out, F* sums,
                          const S* const* pf = nullptr) {
  const S* none[2] = {nullptr, nullptr};
  if (!pf) pf = none;
  with_act(act, [&](auto A) EFFOPS_LAMBDA_INLINE {
    switch (g.KW) {
      case 3:
        return dw_row_k<W, 3, A()>(g, rows, taps, scale, bias, ow0, ow1, out, sums, pf);
      case 5:
        return dw_row_k<W, 5, A()>(g, rows, taps, scale, bias, ow0, ow1, out, sums, pf);
      default:
        return dw_row_k<W, 0, A()>(g, rows, taps, scale, bias, ow0, ow1, out, sums, pf);
    }
  });
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
