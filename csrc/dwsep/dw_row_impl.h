// The depthwise row kernel (one output row segment, every channel), compiled once per ISA level:
// included by exactly one translation unit per level (dw_rows_v4.cpp, dw_rows_v3.cpp,
// dw_rows_base.cpp), which defines before the include
//   EFFOPS_ROWS_W       the level's vector width in bytes (64, 32, 16)
//   EFFOPS_ROWS_TARGET  its target attribute (EFFOPS_TARGET_V4, EFFOPS_TARGET_V3, or nothing)
//   EFFOPS_ROWS_NAME    the entry point dw_core.h declares (dw_row_v4, dw_row_v3, dw_row_base)
// and optionally EFFOPS_ROWS_NATIVE_BF16 1: bf16 outputs stored with vcvtneps2bf16 (dw_rows_v4bf.cpp,
// run on CPUs with AVX512_BF16 only).
// Everything but the entry points has internal linkage, so the three copies never meet.
//
// For each output pixel and each vector of channels the taps accumulate in one register; the
// epilogue applies the per-channel affine and the activation and stores. Padding never
// materialises: taps that fall outside the input are skipped (TensorFlow 'same' padding is just
// asymmetric pt/pb, pl/pr).
//
// What is specialised at compile time, and why (each variant is a copy of the hot loop, and
// copies are what made this file cost minutes of compile time):
// - the activation by class: the clamp family (none, relu, relu6: one clamp with run-time
//   bounds, two min/max per vector), silu (its exp is most of the epilogue and its constants
//   stay in registers), and the rest (hardswish, sigmoid: a run-time switch per vector);
// - the kernel width for 3 and 5 (EfficientNet's and MobileNet's: the tap loop unrolled; a
//   run-time loop made the 5x5 stages ~10% slower), else a run-time loop.
#pragma once
#include <algorithm>
#include <limits>
#include <type_traits>

#include "dwsep/conv.h"
#include "dwsep/dw_core.h"
#include "dwsep/simd.h"

#ifndef EFFOPS_ROWS_NATIVE_BF16
#define EFFOPS_ROWS_NATIVE_BF16 0
#endif
#ifndef EFFOPS_ROWS_W
#error "define EFFOPS_ROWS_W, EFFOPS_ROWS_TARGET and EFFOPS_ROWS_NAME before including dw_row_impl.h"
#endif

namespace effops::dwsep {
namespace {

using simd::loadv;
using simd::storev;
using simd::to_f;

enum ActClass { kClampAct = 0, kSiluAct = 1, kOtherAct = 2 };

// The activation of the epilogue: lo/hi for the clamp class, the code for the others.
template <class F>
struct ActP {
  F lo, hi;
  int code;
};

// The same in registers: the clamp bounds as vectors, made once per row by the noinline
// kernels (a splat from a scalar behind a pointer would be redone after every store, which may
// alias it, and GCC 12 makes such a splat a spill and reload).
template <class V>
struct ActV {
  V lo, hi;
  int code;
};
template <class V, class F>
EFFOPS_INLINE ActV<V> act_vec(const ActP<F>& p) {
  return ActV<V>{simd::splat<V>(p.lo), simd::splat<V>(p.hi), p.code};
}

template <int AC, class V>
EFFOPS_INLINE V act_apply(V x, const ActV<V>& p) {
  if constexpr (AC == kClampAct)
    return x < p.lo ? p.lo : (x > p.hi ? p.hi : x);  // NaN kept, as torch's relu/relu6
  else if constexpr (AC == kSiluAct)
    return simd::act_v(x, simd::kSilu);
  else
    return simd::act_v(x, p.code);
}
template <int AC, class F>
EFFOPS_INLINE F act_apply_s(F x, F lo, F hi, int code) {
  if constexpr (AC == kClampAct)
    return x < lo ? lo : (x > hi ? hi : x);
  else if constexpr (AC == kSiluAct)
    return simd::act_s(x, simd::kSilu);
  else
    return simd::act_s(x, code);
}

// The epilogue of one vector of channels: affine, activation, store; returns the stored value
// (for the channel sums).
template <int AC, class V, class F, class O>
EFFOPS_INLINE V dw_finish(V acc, int64_t c, const F* scale, const F* bias, const ActV<V>& p, O* o) {
  if (scale) acc = acc * loadv<V>(scale + c);
  if (bias) acc = acc + loadv<V>(bias + c);
  acc = act_apply<AC>(acc, p);
#if EFFOPS_ROWS_NATIVE_BF16
  if constexpr (std::is_same<O, simd::bf16>::value && sizeof(V) == 64)
    simd::storev_native_bf16(o + c, acc);
  else
#endif
    storev(o + c, acc);
  return acc;
}

// Output pixels [ow_a, ow_b) of the row, channels [c_begin, C), with bounds checks on every tap
// (border pixels; the channel tail of interior pixels). Out of line (cold next to the interior
// loop), but per kernel width KWC like it: with a run-time tap loop the border pixels of a
// 14-pixel stride-2 row took a tenth of its time.
template <int W, int KWC, int AC, class S, class O, class F>
EFFOPS_ROWS_TARGET __attribute__((noinline)) void dw_pixels(
    const ConvGeom& g, const S* const* rows, const F* taps, const F* scale, const F* bias,
    const ActP<F>& p, int64_t ow_a, int64_t ow_b, int64_t c_begin, int64_t ow0, O* __restrict out,
    F* __restrict sums) {
  using V = typename simd::Traits<F, W>::V;
  constexpr int64_t L = simd::Traits<F, W>::L;
  const int64_t C = g.C, CL = C / L * L, KH = g.KH, KW = KWC ? KWC : g.KW;
  const ActV<V> pv = act_vec<V>(p);
  const F lo = p.lo, hi = p.hi;
  const int code = p.code;
  for (int64_t ow = ow_a; ow < ow_b; ++ow) {
    O* o = out + (ow - ow0) * C;
    const int64_t iw0 = ow * g.sw - g.pl;
    // the taps' column range of this pixel (the in-bounds kw), then CB channel vectors at once:
    // CB independent accumulators (one vector's KH * KW dependent adds made these pixels, 4 of 14
    // per row of a 5x5 conv at 14x14, cost as much as the interior), each with the interior's
    // order of additions
    int64_t kw0 = 0, kw1 = KW;
    while (kw0 < KW && iw0 + kw0 * g.dw < 0) ++kw0;
    while (kw1 > kw0 && iw0 + (kw1 - 1) * g.dw >= g.W) --kw1;
    int64_t c = c_begin;
    constexpr int CB = 4;
    for (; c + CB * L <= CL; c += CB * L) {
      V acc[CB];
#pragma GCC unroll 4
      for (int j = 0; j < CB; ++j) acc[j] = simd::splat<V>(F(0));
      for (int64_t kh = 0; kh < KH; ++kh) {
        const S* r = rows[kh];
        if (!r) continue;
        for (int64_t kw = kw0; kw < kw1; ++kw) {
          const S* px = r + (iw0 + kw * g.dw) * C + c;
          const F* t = taps + (kh * KW + kw) * C + c;
#pragma GCC unroll 4
          for (int j = 0; j < CB; ++j) acc[j] += loadv<V>(px + j * L) * loadv<V>(t + j * L);
        }
      }
#pragma GCC unroll 4
      for (int j = 0; j < CB; ++j) {
        const V v = dw_finish<AC>(acc[j], c + j * L, scale, bias, pv, o);
        if (sums) storev(sums + c + j * L, loadv<V>(sums + c + j * L) + v);
      }
    }
    for (; c < CL; c += L) {
      V acc = simd::splat<V>(F(0));
      for (int64_t kh = 0; kh < KH; ++kh) {
        const S* r = rows[kh];
        if (!r) continue;
        for (int64_t kw = kw0; kw < kw1; ++kw)
          acc += loadv<V>(r + (iw0 + kw * g.dw) * C + c) * loadv<V>(taps + (kh * KW + kw) * C + c);
      }
      acc = dw_finish<AC>(acc, c, scale, bias, pv, o);
      if (sums) storev(sums + c, loadv<V>(sums + c) + acc);
    }
    if constexpr (W > 16) continue;  // the channel tail: half-width vectors, below
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
      acc = act_apply_s<AC>(acc, lo, hi, code);
      simd::store_s(o + c, acc);
      if (sums) sums[c] += acc;
    }
  }
  // Channels past the last full vector (C = 24, 40, 8 ... in pruned or small networks): with
  // vectors of half the width (then a quarter, down to 16 bytes, then scalars). One channel at a
  // time over every tap made a 24-channel depthwise conv 6x slower than a 32-channel one.
  if constexpr (W > 16) {
    if (CL < C) dw_pixels<W / 2, KWC, AC>(g, rows, taps, scale, bias, p, ow_a, ow_b, std::max(c_begin, CL), ow0, out, sums);
  }
}

// PB interior pixels ow, ow + 1, ... (every tap in bounds), the full channel vectors in [c_lo,
// c_hi) (multiples of L): each tap's
// weights are loaded once for the PB pixels. KWC is the kernel width when known at compile
// time, else 0. The channel sums of the PB pixels are added up in registers and added to `sums`
// once (a load-add-store per pixel would chain through store forwarding).
//
// SWC > 0 (bf16 inputs, KWC known, dilation 1, stride SWC: dw_interior_any): each tap row's
// (PB - 1) * SWC + KWC input columns are loaded (bf16 -> float: a widen and a shift) once into
// registers and shared by the PB pixels' taps. Loading per (pixel, tap) is free for float inputs
// (the load folds into the FMA), but for bf16 it was three instructions per multiply-add, which
// made bf16 depthwise rows ~1.5x slower than float ones. The same additions in the same order.
template <int W, int PB, int KWC, int AC, int SWC = 0, class S, class O, class F>
EFFOPS_INLINE void dw_interior(const ConvGeom& g, const S* const* rows, const F* taps,
                               const F* scale, const F* bias,
                               const ActV<typename simd::Traits<F, W>::V>& p, int64_t ow,
                               int64_t c_lo, int64_t c_hi, O* __restrict o, F* __restrict sums) {
  using V = typename simd::Traits<F, W>::V;
  constexpr int64_t L = simd::Traits<F, W>::L;
  const int64_t C = g.C, KH = g.KH, KW = KWC ? KWC : g.KW;
  const int64_t step = g.sw * C, iw0 = ow * g.sw - g.pl;
  for (int64_t c = c_lo; c < c_hi; c += L) {
    V acc[PB];
#pragma GCC unroll 8
    for (int j = 0; j < PB; ++j) acc[j] = simd::splat<V>(F(0));
    for (int64_t kh = 0; kh < KH; ++kh) {
      const S* r = rows[kh];
      if (!r) continue;
      const F* t = taps + kh * KW * C + c;
      const S* p0 = r + iw0 * C + c;
      if constexpr (SWC > 0) {
        V col[(PB - 1) * SWC + KWC];
#pragma GCC unroll 16
        for (int i = 0; i < (PB - 1) * SWC + KWC; ++i) col[i] = loadv<V>(p0 + i * C);
#pragma GCC unroll 7
        for (int kw = 0; kw < KWC; ++kw) {
          const V w = loadv<V>(t + kw * C);
#pragma GCC unroll 8
          for (int j = 0; j < PB; ++j) acc[j] += col[j * SWC + kw] * w;
        }
        continue;
      }
#pragma GCC unroll 7
      for (int64_t kw = 0; kw < KW; ++kw) {
        const V w = loadv<V>(t + kw * C);
        const S* px = p0 + kw * g.dw * C;
#pragma GCC unroll 8
        for (int j = 0; j < PB; ++j) acc[j] += loadv<V>(px + j * step) * w;
      }
    }
    V total = simd::splat<V>(F(0));
#pragma GCC unroll 8
    for (int j = 0; j < PB; ++j) total += dw_finish<AC>(acc[j], c, scale, bias, p, o + j * C);
    if (sums) storev(sums + c, loadv<V>(sums + c) + total);
  }
}

// dw_interior, with its column registers where they apply (bf16 inputs, KWC known, stride 1 or 2).
template <int W, int PB, int KWC, int AC, class S, class O, class F>
EFFOPS_INLINE void dw_interior_any(const ConvGeom& g, const S* const* rows, const F* taps, const F* scale,
                                   const F* bias, const ActV<typename simd::Traits<F, W>::V>& p, int64_t ow,
                                   int64_t c_lo, int64_t c_hi, O* __restrict o, F* __restrict sums) {
  if constexpr (KWC != 0 && !std::is_same<S, F>::value) {
    if (g.dw == 1 && g.sw == 1)
      return dw_interior<W, PB, KWC, AC, 1>(g, rows, taps, scale, bias, p, ow, c_lo, c_hi, o, sums);
    if (g.dw == 1 && g.sw == 2)
      return dw_interior<W, PB, KWC, AC, 2>(g, rows, taps, scale, bias, p, ow, c_lo, c_hi, o, sums);
  }
  dw_interior<W, PB, KWC, AC>(g, rows, taps, scale, bias, p, ow, c_lo, c_hi, o, sums);
}

// Output pixels [ow0, ow1) of one output row. rows[kh] points at the input row (W x C elements)
// tap row kh reads, or is null where that row is padding. The result for pixel ow goes to
// out + (ow - ow0) * C. sums (may be null) accumulates the stored values per channel.
template <int W, int KWC, int AC, class S, class O, class F>
EFFOPS_INLINE void dw_row_k(
    const ConvGeom& g, const S* const* rows, const F* taps, const F* scale, const F* bias,
    const ActP<F>& p, int64_t ow0, int64_t ow1, O* __restrict out, F* __restrict sums,
    const S* const* pf) {
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
  // (the calls only where there are such pixels: most segments of the fused kernel have none)
  if (ow0 < lo) dw_pixels<W, KWC, AC>(g, rows, taps, scale, bias, p, ow0, lo, 0, ow0, out, sums);
  const auto pv = act_vec<typename simd::Traits<F, W>::V>(p);
  // Channel chunks: the input a group of PB pixels reads over every channel (KH rows x (PB - 1) *
  // sw + KW columns x C) outgrows L1 at the late stages' widths (672 channels, 5x5: 107 KB), and
  // the columns the next group shares with it were evicted before their reuse. So the pixels of
  // the row run per chunk of channels whose whole-row footprint stays within ~24 KB (a 5x5 conv
  // with 672 channels at 14x14, batch 8: ~1.35 -> ~1.12 ms with the border change above, one
  // thread; results bit-identical: each element's additions in the same order).
  const int64_t cols = (PB - 1) * g.sw + (KW - 1) * g.dw + 1;
  const int64_t wp = (std::max<int64_t>(hi - lo, 1) - 1) * g.sw + (KW - 1) * g.dw + 1;
  const int64_t vec_bytes = L * static_cast<int64_t>(sizeof(S));
  int64_t chunk = CL;
  if (g.KH * cols * C * static_cast<int64_t>(sizeof(S)) > (int64_t{24} << 10))
    chunk = std::min<int64_t>(CL, std::max<int64_t>(1, (int64_t{24} << 10) / (g.KH * wp * vec_bytes)) * L);
  for (int64_t c_lo = 0; c_lo < CL; c_lo += chunk) {
    const int64_t c_hi = std::min(CL, c_lo + chunk);
    int64_t ow = lo;
    // Software prefetch of the rows the next output row adds (pf, see next_rows), the part under
    // these pixels (every channel, with the first chunk): large inputs stream from DRAM, and the
    // hardware prefetcher, which stops at every 4 KiB page, leaves the loads exposed once the
    // activation lengthens the loop body.
    for (; ow + PB <= hi; ow += PB) {
      const int64_t iw = ow * g.sw - g.pl;  // >= 0 for interior pixels
      const int64_t pf_bytes = std::min<int64_t>(PB * g.sw, g.W - iw) * C * static_cast<int64_t>(sizeof(S));
      if (c_lo == 0)
        for (int r = 0; r < 2; ++r)
          if (pf[r]) {  // stays inside the row: no pointer past the input is formed
            const char* b = reinterpret_cast<const char*>(pf[r] + iw * C);
            for (int64_t i = 0; i < pf_bytes; i += 64) __builtin_prefetch(b + i, 0, 3);
          }
      dw_interior_any<W, PB, KWC, AC>(g, rows, taps, scale, bias, pv, ow, c_lo, c_hi, out + (ow - ow0) * C, sums);
    }
    for (; ow < hi; ++ow)
      dw_interior_any<W, 1, KWC, AC>(g, rows, taps, scale, bias, pv, ow, c_lo, c_hi, out + (ow - ow0) * C, sums);
  }
  if (CL < C && lo < hi)  // channel tail of the interior pixels
    dw_pixels<W, KWC, AC>(g, rows, taps, scale, bias, p, lo, hi, CL, ow0, out, sums);
  if (hi < ow1) dw_pixels<W, KWC, AC>(g, rows, taps, scale, bias, p, hi, ow1, 0, ow0, out, sums);
}

template <int W, int AC, class S, class O, class F>
EFFOPS_INLINE void dw_row_kw(const ConvGeom& g, const S* const* rows, const F* taps,
                             const F* scale, const F* bias, const ActP<F>& p, int64_t ow0,
                             int64_t ow1, O* out, F* sums, const S* const* pf) {
  if (g.KW == 3) return dw_row_k<W, 3, AC>(g, rows, taps, scale, bias, p, ow0, ow1, out, sums, pf);
  if (g.KW == 5) return dw_row_k<W, 5, AC>(g, rows, taps, scale, bias, p, ow0, ow1, out, sums, pf);
  return dw_row_k<W, 0, AC>(g, rows, taps, scale, bias, p, ow0, ow1, out, sums, pf);
}

}  // namespace

template <class S, class O, class F>
EFFOPS_ROWS_TARGET void EFFOPS_ROWS_NAME(const ConvGeom& g, const S* const* rows, const F* taps,
                                         const F* scale, const F* bias, int act, int64_t ow0,
                                         int64_t ow1, O* out, F* sums, const S* const* pf) {
  const S* none[2] = {nullptr, nullptr};
  if (!pf) pf = none;
  constexpr F inf = std::numeric_limits<F>::infinity();
  ActP<F> p{-inf, inf, act};
  switch (act) {
    case simd::kSilu:
      return dw_row_kw<EFFOPS_ROWS_W, kSiluAct>(g, rows, taps, scale, bias, p, ow0, ow1, out, sums, pf);
    case simd::kHardswish:
    case simd::kSigmoid:
      return dw_row_kw<EFFOPS_ROWS_W, kOtherAct>(g, rows, taps, scale, bias, p, ow0, ow1, out, sums, pf);
    case simd::kRelu:
      p.lo = F(0);
      break;
    case simd::kRelu6:
      p.lo = F(0), p.hi = F(6);
      break;
    default:
      break;
  }
  return dw_row_kw<EFFOPS_ROWS_W, kClampAct>(g, rows, taps, scale, bias, p, ow0, ow1, out, sums, pf);
}

#define EFFOPS_ROWS_INSTANTIATE(S, O, F)                                                       \
  template EFFOPS_ROWS_TARGET void EFFOPS_ROWS_NAME<S, O, F>(                                  \
      const ConvGeom&, const S* const*, const F*, const F*, const F*, int, int64_t, int64_t, \
      O*, F*, const S* const*);

}  // namespace effops::dwsep
