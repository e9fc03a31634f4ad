// Int8 depthwise convolution (NHWC). AVX-512 (VNNI + VBMI): 4 taps per vpdpbusd on "quad rows"
// (rows_512 below). AVX-VNNI: per output pixel, each block of channels accumulates its taps in
// int32 lanes with vpdpwssd (a 16 x 16 -> 32 bit multiply-add: the code x or x - x_zp in the low
// int16 of a lane, the weight in the low int16 of the other operand's lane with a zero high half,
// so the pair sum is the one exact product); interior pixels multiply the raw codes and take the
// zero point out through the bias (bias - x_zp * sum of the taps), border pixels, whose
// out-of-range taps read real zeros, subtract x_zp from each code instead. Integer arithmetic:
// every level gives the reference's codes exactly.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/parallel.h"
#include "qconv/qcore.h"

namespace effops::qconv {
namespace detail {

// The SIMD levels' quad rows (rows_512, rows_256q below): a ring of KH rows of Wn quad columns of
// Cp int32 per task, up to kQuadRingMax bytes (larger rings: rows_256 or the scalar code).
constexpr int64_t kQuadRingMax = int64_t{64} << 20;

// Which quad columns a ring row stores: the taps read columns ow * sw + 4q (q < NG), Wq of them;
// when the stride divides 4 every one of those is a multiple of cs = sw, so only every cs-th
// column is kept, Wn in all; a pixel then moves ps stored columns and a quad qs.
struct QuadCols {
  int64_t cs, Wn, ps, qs;
};
inline QuadCols quad_cols(const DwGeom& g, int64_t NG) {
  const int64_t Wq = (g.Wo - 1) * g.sw + 4 * (NG - 1) + 1;
  const int64_t cs = 4 % g.sw == 0 ? g.sw : 1;
  return {cs, (Wq - 1) / cs + 1, g.sw / cs, 4 / cs};
}

DwPrep prep_dw(int lvl, const int8_t* taps, const DwGeom& g, int32_t x_zp, const Epilogue& e) {
  // Only what the level's kernel reads, written in order (per call: 1152 channels x 5x5 took ~30
  // us when every layout was built with strided stores, a 1x1152x7x7 conv's whole time).
  DwPrep p;
  const int64_t T = g.KH * g.KW, C = g.C;
  p.Cp = round_up(C, 16);
  p.bias.assign(static_cast<size_t>(p.Cp), 0);
  p.bias_int.assign(static_cast<size_t>(p.Cp), 0);
  p.mult.assign(static_cast<size_t>(p.Cp), 0.0f);
  p.NG = (g.KW + 3) / 4;
  p.quad = lvl >= 1 && g.KH * quad_cols(g, p.NG).Wn * p.Cp * 4 <= kQuadRingMax;
  for (int64_t c = 0; c < C; ++c) {  // taps [C, KH, KW] (the conv weight's layout)
    int32_t sum = 0;
    for (int64_t t = 0; t < T; ++t) sum += taps[c * T + t];
    p.bias[c] = e.bias ? e.bias[c] : 0;
    p.bias_int[c] = wadd(p.bias[c], -x_zp * sum);  // |x_zp * sum| <= 255 * 128 * T < 2^30
    p.mult[c] = e.mult[c];
  }
  if (lvl == 1 && e.lut) p.lut32.assign(e.lut, e.lut + 256);  // the AVX2 kernels' gathers
  if (lvl == 1 && !p.quad) {  // rows_256: [KH * KW][Cp], w as the low int16 of an int32 lane
    p.taps32.assign(static_cast<size_t>(T * p.Cp), 0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c)
        p.taps32[t * p.Cp + c] = static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(taps[c * T + t])));
  }
  if (p.quad) {  // rows_512 / rows_256q: [KH * NG][Cp], taps kw = 4q..4q+3 as 4 bytes (0 past KW)
    p.quads.assign(static_cast<size_t>(g.KH * p.NG * p.Cp), 0);
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t q = 0; q < p.NG; ++q) {
        int32_t* dst = &p.quads[(kh * p.NG + q) * p.Cp];
        const int64_t n = std::min<int64_t>(4, g.KW - 4 * q);
        const int8_t* src = taps + kh * g.KW + 4 * q;
        for (int64_t c = 0; c < C; ++c, src += T) {
          uint32_t v = 0;
          for (int64_t j = 0; j < n; ++j) v |= static_cast<uint32_t>(static_cast<uint8_t>(src[j])) << (8 * j);
          dst[c] = static_cast<int32_t>(v);
        }
      }
  }
  return p;
}

namespace {

// Channels [c0, C) of one output pixel, exactly as the reference (also the SIMD levels' tails).
void pixel_scalar(const uint8_t* xi, const int8_t* taps, const DwGeom& g, int64_t oh, int64_t ow, int64_t c0,
                  int32_t x_zp, const Epilogue& e, uint8_t* yp, int32_t* sums) {
  const int64_t C = g.C;
  for (int64_t c = c0; c < C; ++c) {
    int32_t acc = e.bias ? e.bias[c] : 0;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = oh * g.sh - g.pt + kh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t iw = ow * g.sw - g.pl + kw;
        if (iw < 0 || iw >= g.W) continue;
        acc = wadd(acc, (static_cast<int32_t>(xi[(ih * g.W + iw) * C + c]) - x_zp) * taps[c * g.KH * g.KW + kh * g.KW + kw]);
      }
    }
    yp[c] = finish(acc, e.mult[c], 0, e);
    if (sums) sums[c] += yp[c];
  }
}

void rows_scalar(const uint8_t* xi, const int8_t* taps, const DwGeom& g, int64_t oh0, int64_t oh1, int32_t x_zp,
                 const Epilogue& e, uint8_t* y, int32_t* sums) {
  for (int64_t oh = oh0; oh < oh1; ++oh)
    for (int64_t ow = 0; ow < g.Wo; ++ow)
      pixel_scalar(xi, taps, g, oh, ow, 0, x_zp, e, y + ((oh - oh0) * g.Wo + ow) * g.C, sums);
}

#if EFFOPS_X86
// AVX-512: 4 taps per vpdpbusd (u8 codes x s8 weights, 4 products summed into an int32 lane).
// The input rows a task reads are rewritten once each into a ring of KH "quad rows": lane (j, c)
// of a quad row holds the codes of padded columns j, j+1, j+2, j+3 of channel c, so the taps
// kw = 4q..4q+3 of output pixel ow are one lane of column ow * sw + 4q against the weights' bytes
// (zero past KW). Padding is the code x_zp and the raw codes are multiplied: the zero point comes
// out through the bias (bias - x_zp * sum of the taps) for every pixel, borders included. A 3x3
// conv is 3 instructions per 16 channels of a pixel (9 vpdpwssd before), a 5x5 10 (25).

// Stores Wn quad columns, every cs-th (quad_cols).
QT512 void quad_row_512(const uint8_t* xi, const DwGeom& g, int64_t Cp, int64_t ih, int64_t Wn, int64_t cs,
                        int32_t x_zp, int32_t* row) {
  // byte 4c + k of the result = byte 16k + c of the four columns' 16 bytes
  alignas(64) static constexpr uint8_t kIdx[64] = {
      0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21, 37, 53,
      6, 22, 38, 54, 7, 23, 39, 55, 8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
      12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};
  const __m512i idx = _mm512_load_si512(kIdx);
  const __m128i zpv = _mm_set1_epi8(static_cast<char>(x_zp));
  const bool inside = ih >= 0 && ih < g.H;
  const int64_t C = g.C;
  const uint8_t* src = xi + (inside ? ih : 0) * g.W * C;
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const __mmask16 m = C - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (C - c0)) - 1);
    auto col = [&](int64_t j) EFFOPS_QLAMBDA {
      const int64_t iw = j - g.pl;
      return inside && iw >= 0 && iw < g.W ? _mm_mask_loadu_epi8(zpv, m, src + iw * C + c0) : zpv;
    };
    __m128i a = col(0), b = col(1), c = col(2), d = col(3);
    for (int64_t i = 0; i < Wn; ++i) {
      if (i > 0) {  // the window moves cs columns: the codes still inside it are kept
        const int64_t j = i * cs;
        if (cs == 1) {
          a = b, b = c, c = d, d = col(j + 3);
        } else if (cs == 2) {
          a = c, b = d, c = col(j + 2), d = col(j + 3);
        } else {
          a = col(j), b = col(j + 1), c = col(j + 2), d = col(j + 3);
        }
      }
      __m512i v = _mm512_castsi128_si512(a);
      v = _mm512_inserti32x4(v, b, 1);
      v = _mm512_inserti32x4(v, c, 2);
      v = _mm512_inserti32x4(v, d, 3);
      _mm512_storeu_si512(row + i * Cp + c0, _mm512_permutexvar_epi8(idx, v));
    }
  }
}

// The ring of KH quad rows the output rows of a task read (rows_512, rows_256q): row ih lives in
// slot ih mod KH; per output row, build the rows from missing(ih0) to ih0 + KH - 1, then point().
// Per-thread storage, used through local pointers: a thread_local in a shared library is reached
// through __tls_get_addr, which in the tap loop made the kernel 4x slower.
struct QuadRing {
  int32_t* ring;
  const int32_t** rows;  // rows[kh]: input row ih0 + kh of the current output row
  int64_t KH, len, filled;
  QuadRing(int64_t kh, int64_t row_len, int64_t first_ih) : KH(kh), len(row_len), filled(first_ih - 1) {
    thread_local std::vector<int32_t> ring_store;
    thread_local std::vector<const int32_t*> rows_store;
    ring_store.resize(static_cast<size_t>(KH * len));
    rows_store.resize(static_cast<size_t>(KH));
    ring = ring_store.data(), rows = rows_store.data();
  }
  int32_t* slot(int64_t ih) const { return ring + ((ih % KH + KH) % KH) * len; }
  int64_t missing(int64_t ih0) const { return std::max(filled + 1, ih0); }
  void point(int64_t ih0) {
    filled = ih0 + KH - 1;
    for (int64_t kh = 0; kh < KH; ++kh) rows[kh] = slot(ih0 + kh);
  }
};

// KH_, NG_ > 0: the kernel height and the quads per row known at compile time (3x3: 3 x 1, 5x5:
// 5 x 2), the weights held in registers; 0: any size, the weights read from L1.
template <int KH_, int NG_>
QT512 void rows_512(const uint8_t* xi, const DwPrep& p, const DwGeom& g, int64_t oh0, int64_t oh1, int32_t x_zp,
                    const Epilogue& e, uint8_t* y, int32_t* sums) {
  const int64_t C = g.C, Cp = p.Cp, KH = KH_ ? KH_ : g.KH, NG = NG_ ? NG_ : p.NG;
  const QuadCols qc = quad_cols(g, NG);
  const int64_t cs = qc.cs, Wn = qc.Wn, ps = qc.ps, qs = qc.qs;
  QuadRing ring(KH, Wn * Cp, oh0 * g.sh - g.pt);
  const int32_t** const rows = ring.rows;
  const __m512i ozp = _mm512_set1_epi32(e.zp);
  const __m512i qmin = _mm512_set1_epi32(e.qmin), qmax = _mm512_set1_epi32(e.qmax);
  const __m512 lo = _mm512_set1_ps(-kClamp), hi = _mm512_set1_ps(kClamp);
  const bool lut = e.lut != nullptr;
  const Lut512 L = lut ? lut512_load(e.lut) : Lut512{};
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const int64_t ih0 = oh * g.sh - g.pt;
    for (int64_t ih = ring.missing(ih0); ih < ih0 + KH; ++ih) quad_row_512(xi, g, Cp, ih, Wn, cs, x_zp, ring.slot(ih));
    ring.point(ih0);
    uint8_t* yrow = y + (oh - oh0) * g.Wo * C;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const __mmask16 m = C - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (C - c0)) - 1);
      const __m512i bias = _mm512_loadu_si512(&p.bias_int[c0]);
      const __m512 mult = _mm512_loadu_ps(&p.mult[c0]);
      __m512i rsum = _mm512_setzero_si512();
      // the requantisation epilogue of one pixel's 16 channels
      auto finish = [&](__m512i acc, int64_t ow) EFFOPS_QLAMBDA {
        __m512 v = _mm512_mul_ps(_mm512_cvt_roundepi32_ps(acc, kRne), mult);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        __m512i q = _mm512_add_epi32(_mm512_cvt_roundps_epi32(v, kRne), ozp);
        q = _mm512_min_epi32(_mm512_max_epi32(q, qmin), qmax);
        __m128i b = _mm512_cvtepi32_epi8(q);
        if (lut) b = lut512_apply(L, b);
        _mm_mask_storeu_epi8(yrow + ow * C + c0, m, b);
        rsum = _mm512_add_epi32(rsum, _mm512_cvtepu8_epi32(b));
      };
      constexpr int kW = KH_ * NG_;
      __m512i wv[kW > 0 ? kW : 1];
      if constexpr (kW > 0)
        for (int t = 0; t < kW; ++t) wv[t] = _mm512_loadu_si512(&p.quads[t * Cp + c0]);
      const int64_t step = ps * Cp;
      int64_t ow = 0;
      // PB pixels at once: PB independent accumulation chains
      constexpr int PB = 4;
      for (; ow + PB <= g.Wo; ow += PB) {
        __m512i acc[PB];
        for (int j = 0; j < PB; ++j) acc[j] = bias;
        const int64_t col = ow * step + c0;
        if constexpr (kW > 0) {
          for (int kh = 0; kh < KH_; ++kh)
            for (int q = 0; q < NG_; ++q) {
              const int32_t* r = rows[kh] + col + q * qs * Cp;
              for (int j = 0; j < PB; ++j)
                acc[j] = dpbusd512(acc[j], _mm512_loadu_si512(r + j * step), wv[kh * NG_ + q]);
            }
        } else {
          for (int64_t kh = 0; kh < KH; ++kh)
            for (int64_t q = 0; q < NG; ++q) {
              const int32_t* r = rows[kh] + col + q * qs * Cp;
              const __m512i w = _mm512_loadu_si512(&p.quads[(kh * NG + q) * Cp + c0]);
              for (int j = 0; j < PB; ++j) acc[j] = dpbusd512(acc[j], _mm512_loadu_si512(r + j * step), w);
            }
        }
        for (int j = 0; j < PB; ++j) finish(acc[j], ow + j);
      }
      for (; ow < g.Wo; ++ow) {
        __m512i acc = bias;
        const int64_t col = ow * step + c0;
        for (int64_t kh = 0; kh < KH; ++kh)
          for (int64_t q = 0; q < NG; ++q)
            acc = dpbusd512(acc, _mm512_loadu_si512(rows[kh] + col + q * qs * Cp),
                                      _mm512_loadu_si512(&p.quads[(kh * NG + q) * Cp + c0]));
        finish(acc, ow);
      }
      if (sums) {
        const __m512i s = _mm512_maskz_loadu_epi32(m, sums + c0);
        _mm512_mask_storeu_epi32(sums + c0, m, _mm512_add_epi32(s, rsum));
      }
    }
  }
}

// AVX2: the quad rows of rows_512 on 8 channels per ymm, for channels [0, C8) (the rest by
// pixel_scalar): 4 taps per vpdpbusd (AVX-VNNI, or its vpmaddwd emulation). The 4 columns' 8
// bytes are interleaved with two rounds of unpacks (AVX2 has no vpermb).
QT256 void quad_row_256(const uint8_t* xi, const DwGeom& g, int64_t Cp, int64_t C8, int64_t ih, int64_t Wn,
                        int64_t cs, int32_t x_zp, int32_t* row) {
  const __m128i zpv = _mm_set1_epi8(static_cast<char>(x_zp));
  const bool inside = ih >= 0 && ih < g.H;
  const int64_t C = g.C;
  const uint8_t* src = xi + (inside ? ih : 0) * g.W * C;
  for (int64_t c0 = 0; c0 < C8; c0 += 8) {
    auto col = [&](int64_t j) EFFOPS_QLAMBDA256 {
      const int64_t iw = j - g.pl;
      return inside && iw >= 0 && iw < g.W ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + iw * C + c0)) : zpv;
    };
    __m128i a = col(0), b = col(1), c = col(2), d = col(3);
    for (int64_t i = 0; i < Wn; ++i) {
      if (i > 0) {
        const int64_t j = i * cs;
        if (cs == 1) {
          a = b, b = c, c = d, d = col(j + 3);
        } else if (cs == 2) {
          a = c, b = d, c = col(j + 2), d = col(j + 3);
        } else {
          a = col(j), b = col(j + 1), c = col(j + 2), d = col(j + 3);
        }
      }
      const __m128i ab = _mm_unpacklo_epi8(a, b), cd = _mm_unpacklo_epi8(c, d);  // a0 b0 a1 b1 ..
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + i * Cp + c0),
                          _mm256_set_m128i(_mm_unpackhi_epi16(ab, cd), _mm_unpacklo_epi16(ab, cd)));
    }
  }
}

template <int KH_, int NG_, bool VNNI>
QT256 void rows_256q(const uint8_t* xi, const int8_t* taps, const DwPrep& p, const DwGeom& g, int64_t oh0,
                     int64_t oh1, int32_t x_zp, const Epilogue& e, uint8_t* y, int32_t* sums) {
  const int64_t C = g.C, Cp = p.Cp, C8 = C / 8 * 8, KH = KH_ ? KH_ : g.KH, NG = NG_ ? NG_ : p.NG;
  const QuadCols qc = quad_cols(g, NG);
  const int64_t cs = qc.cs, Wn = qc.Wn, ps = qc.ps, qs = qc.qs;
  QuadRing ring(KH, Wn * Cp, oh0 * g.sh - g.pt);
  const int32_t** const rows = ring.rows;
  const __m256i ozp = _mm256_set1_epi32(e.zp);
  const __m256i qmin = _mm256_set1_epi32(e.qmin), qmax = _mm256_set1_epi32(e.qmax);
  const __m256 lo = _mm256_set1_ps(-kClamp), hi = _mm256_set1_ps(kClamp);
  const bool lut = !p.lut32.empty();
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const int64_t ih0 = oh * g.sh - g.pt;
    for (int64_t ih = ring.missing(ih0); ih < ih0 + KH; ++ih)
      quad_row_256(xi, g, Cp, C8, ih, Wn, cs, x_zp, ring.slot(ih));
    ring.point(ih0);
    uint8_t* yrow = y + (oh - oh0) * g.Wo * C;
    for (int64_t c0 = 0; c0 < C8; c0 += 8) {
      const __m256i bias = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&p.bias_int[c0]));
      const __m256 mult = _mm256_loadu_ps(&p.mult[c0]);
      __m256i rsum = _mm256_setzero_si256();
      auto finish = [&](__m256i acc, int64_t ow) EFFOPS_QLAMBDA256 {
        __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), mult), lo), hi);
        __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_round_ps(v, kRne)), ozp);
        q = _mm256_min_epi32(_mm256_max_epi32(q, qmin), qmax);
        if (lut) q = _mm256_i32gather_epi32(p.lut32.data(), q, 4);
        rsum = _mm256_add_epi32(rsum, q);
        const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(yrow + ow * C + c0), _mm_packus_epi16(w16, w16));
      };
      constexpr int kW = KH_ * NG_;
      __m256i wv[kW > 0 ? kW : 1];
      if constexpr (kW > 0)
        for (int t = 0; t < kW; ++t) wv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&p.quads[t * Cp + c0]));
      const int64_t step = ps * Cp;
      int64_t ow = 0;
      constexpr int PB = VNNI ? 4 : 2;  // the emulation needs registers of its own
      for (; ow + PB <= g.Wo; ow += PB) {
        __m256i acc[PB];
        for (int j = 0; j < PB; ++j) acc[j] = bias;
        const int64_t col = ow * step + c0;
        for (int64_t kh = 0; kh < KH; ++kh)
          for (int64_t q = 0; q < NG; ++q) {
            const int32_t* r = rows[kh] + col + q * qs * Cp;
            __m256i w;
            if constexpr (kW > 0)
              w = wv[kh * NG_ + q];
            else
              w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&p.quads[(kh * NG + q) * Cp + c0]));
            for (int j = 0; j < PB; ++j)
              acc[j] = dpbusd256<VNNI>(acc[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + j * step)), w);
          }
        for (int j = 0; j < PB; ++j) finish(acc[j], ow + j);
      }
      for (; ow < g.Wo; ++ow) {
        __m256i acc = bias;
        const int64_t col = ow * step + c0;
        for (int64_t kh = 0; kh < KH; ++kh)
          for (int64_t q = 0; q < NG; ++q)
            acc = dpbusd256<VNNI>(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[kh] + col + q * qs * Cp)),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&p.quads[(kh * NG + q) * Cp + c0])));
        finish(acc, ow);
      }
      if (sums) {
        const __m256i s0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + c0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + c0), _mm256_add_epi32(s0, rsum));
      }
    }
    if (C8 < C)
      for (int64_t ow = 0; ow < g.Wo; ++ow) pixel_scalar(xi, taps, g, oh, ow, C8, x_zp, e, yrow + ow * C, sums);
  }
}

template <bool VNNI>
QT256 void rows_256(const uint8_t* xi, const int8_t* taps, const DwPrep& p, const DwGeom& g, int64_t oh0,
                    int64_t oh1, int32_t x_zp, const Epilogue& e, uint8_t* y, int32_t* sums) {
  const int64_t C = g.C, Cp = p.Cp, C8 = C / 8 * 8;
  const __m256i zp = _mm256_set1_epi32(x_zp), ozp = _mm256_set1_epi32(e.zp);
  const __m256i qmin = _mm256_set1_epi32(e.qmin), qmax = _mm256_set1_epi32(e.qmax);
  const __m256 lo = _mm256_set1_ps(-kClamp), hi = _mm256_set1_ps(kClamp);
  const bool lut = !p.lut32.empty();
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const int64_t ih0 = oh * g.sh - g.pt;
    const int64_t kh0 = std::max<int64_t>(0, -ih0), kh1 = std::min<int64_t>(g.KH, g.H - ih0);
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      const int64_t iw0 = ow * g.sw - g.pl;
      const int64_t kw0 = std::max<int64_t>(0, -iw0), kw1 = std::min<int64_t>(g.KW, g.W - iw0);
      const bool interior = kh0 == 0 && kh1 == g.KH && kw0 == 0 && kw1 == g.KW;
      uint8_t* yp = y + ((oh - oh0) * g.Wo + ow) * C;
      for (int64_t c0 = 0; c0 < C8; c0 += 8) {
        __m256i acc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(interior ? &p.bias_int[c0] : &p.bias[c0]));
        for (int64_t kh = kh0; kh < kh1; ++kh) {
          const uint8_t* xr = xi + ((ih0 + kh) * g.W + iw0) * C + c0;
          const int32_t* wr = &p.taps32[(kh * g.KW) * Cp + c0];
          for (int64_t kw = kw0; kw < kw1; ++kw) {
            __m256i xv = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xr + kw * C)));
            if (!interior) xv = _mm256_sub_epi32(xv, zp);
            acc = dpwssd256<VNNI>(acc, xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + kw * Cp)));
          }
        }
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(&p.mult[c0]));
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(v, kRne));
        q = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(q, ozp), qmin), qmax);
        if (lut) q = _mm256_i32gather_epi32(p.lut32.data(), q, 4);
        const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(yp + c0), _mm_packus_epi16(w16, w16));
        if (sums) {
          __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + c0));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + c0), _mm256_add_epi32(s, q));
        }
      }
      if (C8 < C) pixel_scalar(xi, taps, g, oh, ow, C8, x_zp, e, yp, sums);
    }
  }
}
#endif

}  // namespace

void dw_rows(int lvl, const uint8_t* xi, const int8_t* taps, const DwPrep& p, const DwGeom& g, int64_t oh0,
             int64_t oh1, int32_t x_zp, const Epilogue& e, uint8_t* y, int32_t* sums) {
#if EFFOPS_X86
  if (lvl == 2 && p.quad) {
    if (g.KH == 3 && g.KW == 3) return rows_512<3, 1>(xi, p, g, oh0, oh1, x_zp, e, y, sums);
    if (g.KH == 5 && g.KW == 5) return rows_512<5, 2>(xi, p, g, oh0, oh1, x_zp, e, y, sums);
    return rows_512<0, 0>(xi, p, g, oh0, oh1, x_zp, e, y, sums);
  }
  if (lvl == 1 && p.quad) {
    const bool v = vnni256();
    if (g.KH == 3 && g.KW == 3)
      return v ? rows_256q<3, 1, true>(xi, taps, p, g, oh0, oh1, x_zp, e, y, sums)
               : rows_256q<3, 1, false>(xi, taps, p, g, oh0, oh1, x_zp, e, y, sums);
    if (g.KH == 5 && g.KW == 5)
      return v ? rows_256q<5, 2, true>(xi, taps, p, g, oh0, oh1, x_zp, e, y, sums)
               : rows_256q<5, 2, false>(xi, taps, p, g, oh0, oh1, x_zp, e, y, sums);
    return v ? rows_256q<0, 0, true>(xi, taps, p, g, oh0, oh1, x_zp, e, y, sums)
             : rows_256q<0, 0, false>(xi, taps, p, g, oh0, oh1, x_zp, e, y, sums);
  }
  if (lvl == 1)
    return vnni256() ? rows_256<true>(xi, taps, p, g, oh0, oh1, x_zp, e, y, sums)
                     : rows_256<false>(xi, taps, p, g, oh0, oh1, x_zp, e, y, sums);
#endif
  rows_scalar(xi, taps, g, oh0, oh1, x_zp, e, y, sums);
}

}  // namespace detail

int level() {
#if EFFOPS_X86
  const Isa i = ::effops::isa();
  // the AVX-512 level also uses VBMI (vpermi2b) for the activation tables
  static const bool vbmi = [] { __builtin_cpu_init(); return __builtin_cpu_supports("avx512vbmi") != 0; }();
  if (i >= kV4 && cpu_has_avx512vnni() && vbmi && vnni_on()) return 2;
  if (i >= kV3) return 1;  // AVX2, with AVX-VNNI where the CPU has it (vnni256)
#endif
  return 0;
}

const char* level_name(int lvl) {
  return lvl == 2 ? "avx512-vnni" : (lvl == 1 ? (vnni256() ? "avx-vnni" : "avx2") : "scalar");
}

void q_dw(const uint8_t* x, const int8_t* taps, const DwGeom& g, int32_t x_zp, const Epilogue& e, uint8_t* y,
          int32_t* sums, int threads) {
  using namespace detail;
  if (g.N == 0 || g.C == 0) return;  // an empty batch: no output, no sums (the task split divides by N)
  const int lvl = level();
  const DwPrep p = prep_dw(lvl, taps, g, x_zp, e);
  // Tasks: blocks of output rows of one image; per-task channel sums, added after (integer sums:
  // the order does not matter). A task builds its KH quad rows afresh (rows_512's ring), so the
  // blocks are as tall as the threads allow: one image per task on one thread or with >= 2 images
  // per thread, else about 2 tasks per thread (1x1152x7x7 5x5 on one thread: 1-row tasks built 35
  // quad rows instead of 11, 97 -> 40 us).
  const int64_t T = std::max(threads, 1);
  const int64_t want = T == 1 || g.N >= 2 * T ? 1 : (2 * T + g.N - 1) / g.N;
  const int64_t rb = std::max<int64_t>(1, (g.Ho + want - 1) / want);
  const int64_t blocks = (g.Ho + rb - 1) / rb;
  std::vector<int32_t> part(sums ? static_cast<size_t>(g.N * blocks * p.Cp) : 0, 0);
  parallel_for(g.N * blocks, threads, [&](int64_t t, int) {
    const int64_t n = t / blocks, oh0 = (t % blocks) * rb, oh1 = std::min(g.Ho, oh0 + rb);
    dw_rows(lvl, x + n * g.H * g.W * g.C, taps, p, g, oh0, oh1, x_zp, e, y + (n * g.Ho + oh0) * g.Wo * g.C,
            sums ? &part[t * p.Cp] : nullptr);
  });
  if (sums) {
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < g.C; ++c) {
        int32_t s = 0;
        for (int64_t b = 0; b < blocks; ++b) s += part[(n * blocks + b) * p.Cp + c];
        sums[n * g.C + c] = s;
      }
  }
}

}  // namespace effops::qconv
