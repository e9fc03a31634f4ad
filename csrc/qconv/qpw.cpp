// Int8 pointwise convolution as a GEMM (uint8 activations x int8 weights -> int32) with the
// requantising epilogue, and the fused depthwise-separable driver.
//
// VNNI tile: vpdpbusd adds, in each int32 lane, the four products of 4 unsigned bytes of A
// (4 consecutive input channels of one pixel, broadcast to every lane) with 4 signed bytes of B
// (the same 4 input channels of the lane's output channel). B is packed per panel of NR output
// channels as [K/4][NR][4]. The zero point of A goes into the bias once per call:
// sum (a - zp) w = sum a w - zp sum w. AVX-512: 6 rows x 64 output channels (24 zmm
// accumulators); AVX-VNNI: 6 rows x 16 (12 ymm).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/parallel.h"
#include "common/amx.h"
#include "qconv/qcore.h"

namespace effops::qconv {
namespace detail {

namespace {

// bias - x_zp * sum_k w per output channel, and the weights in the level's panels.
void pack_into(int lvl, const int8_t* w, int64_t K, int64_t Co, int32_t x_zp, const int32_t* bias, int32_t* bias_out,
               int8_t* packed) {
  for (int64_t co = 0; co < Co; ++co) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += w[co * K + k];
    bias_out[co] = wadd(bias ? bias[co] : 0, -x_zp * s);  // |x_zp * s| < 2^30 (K is bounded)
  }
  if (lvl == 0) return;
  const int64_t NR = lvl == 2 ? 64 : 16, K4 = round_up(K, 4), kfull = K / 4;
  for (int64_t co = 0; co < Co; ++co) {  // 4 bytes (one lane's k-quad) at a time
    int8_t* dst = packed + (co / NR) * K4 * NR + (co % NR) * 4;
    const int8_t* src = w + co * K;
    for (int64_t kq = 0; kq < kfull; ++kq) std::memcpy(dst + kq * NR * 4, src + kq * 4, 4);
    if (K & 3) std::memcpy(dst + kfull * NR * 4, src + kfull * 4, static_cast<size_t>(K & 3));
  }
}

}  // namespace

void pack_blob(int lvl, const int8_t* w, int64_t K, int64_t Co, int32_t x_zp, const int32_t* bias, uint8_t* blob) {
  const int64_t cop = round_up(Co, 64);
  std::memset(blob, 0, static_cast<size_t>(blob_bytes(Co, K)));
  const int64_t head[8] = {kBlobMagic, lvl, Co, K, lvl == 2 ? 64 : 16, x_zp, bias != nullptr, 0};
  std::memcpy(blob, head, sizeof(head));
  pack_into(lvl, w, K, Co, x_zp, bias, reinterpret_cast<int32_t*>(blob + 64),
            reinterpret_cast<int8_t*>(blob + 64 + 4 * cop));
}

PwPrep prep_pw(int lvl, const int8_t* w, int64_t K, int64_t Co, int32_t x_zp, const Epilogue& e,
               const uint8_t* blob, int64_t nbytes) {
  PwPrep p;
  p.lvl = lvl, p.K = K, p.Co = Co;
  p.vnni = lvl == 1 && vnni256();
  p.NR = lvl == 2 ? 64 : 16;
  p.K4 = round_up(K, 4);
  p.panels = (Co + p.NR - 1) / p.NR;
  const int64_t Cop = p.panels * p.NR;
  p.mult.assign(static_cast<size_t>(Cop), 0.0f);
  for (int64_t co = 0; co < Co; ++co) p.mult[co] = e.mult[co];
  int64_t head[8] = {0};
  if (blob && nbytes >= blob_bytes(Co, K)) std::memcpy(head, blob, sizeof(head));
  if (head[0] == kBlobMagic && head[1] == lvl && head[2] == Co && head[3] == K && head[4] == p.NR &&
      head[5] == x_zp && head[6] == (e.bias != nullptr)) {
    p.bias = reinterpret_cast<const int32_t*>(blob + 64);
    p.packed = reinterpret_cast<const int8_t*>(blob + 64 + 4 * round_up(Co, 64));
  } else {  // no blob, or one made for another level / zero point: pack now
    p.own_bias.assign(static_cast<size_t>(Cop), 0);
    if (lvl > 0) p.own_packed.assign(static_cast<size_t>(p.panels * p.K4 * p.NR), 0);
    pack_into(lvl, w, K, Co, x_zp, e.bias, p.own_bias.data(), p.own_packed.data());
    p.bias = p.own_bias.data();
    p.packed = p.own_packed.data();
  }
  if (e.lut) {
    p.lut32.resize(256);
    for (int i = 0; i < 256; ++i) p.lut32[i] = e.lut[i];
  }
  return p;
}

namespace {

inline int32_t load4(const uint8_t* a) {
  int32_t v;
  std::memcpy(&v, a, 4);
  return v;
}
inline int32_t load_tail(const uint8_t* a, int64_t n) {  // n < 4 bytes, the rest zero
  int32_t v = 0;
  std::memcpy(&v, a, static_cast<size_t>(n));
  return v;
}

void gemm_scalar(const PwPrep& p, const int8_t* w, const uint8_t* a, int64_t lda, int64_t M, const Epilogue& e,
                 const Residual& res, const uint8_t* rr, uint8_t* out) {
  const int64_t K = p.K, Co = p.Co;
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* ar = a + m * lda;
    for (int64_t co = 0; co < Co; ++co) {
      const int8_t* wr = w + co * K;
      int32_t s = 0;  // < 2^30: exact
      for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(ar[k]) * wr[k];
      const int32_t extra = rr ? residual_term(res, rr[m * Co + co]) : 0;
      out[m * Co + co] = finish(wadd(p.bias[co], s), p.mult[co], extra, e);
    }
  }
}

#if EFFOPS_X86
// The AVX-512 requantising epilogue's constants (finish_v512: acc, the int32 sums with the bias,
// -> codes, masked to the channels below Co).
struct Epi512 {
  __m512i ozp, qmin, qmax, rzp, qmin8, qmax8;
  __m512 lo, hi, rm;
  Lut512 L;
};
QT512 inline Epi512 epi512(const Epilogue& e, const Residual& res) {
  return {_mm512_set1_epi32(e.zp), _mm512_set1_epi32(e.qmin), _mm512_set1_epi32(e.qmax), _mm512_set1_epi32(res.zp),
          _mm512_set1_epi8(static_cast<char>(e.qmin)), _mm512_set1_epi8(static_cast<char>(e.qmax)),
          _mm512_set1_ps(-kClamp), _mm512_set1_ps(kClamp), _mm512_set1_ps(res.mult),
          e.lut ? lut512_load(e.lut) : Lut512{}};
}

// One vector of 16 output channels: acc -> requantised int32 codes with the output zero point
// and, when rr is set, the requantised residual added (before the clamp); m: the valid channels.
QT512 inline __m512i requant_512(const Epi512& c, __m512i acc, __m512 mult, __mmask16 m, const uint8_t* rr) {
  __m512 v = _mm512_mul_ps(_mm512_cvt_roundepi32_ps(acc, kRne), mult);
  v = _mm512_min_ps(_mm512_max_ps(v, c.lo), c.hi);
  __m512i q = _mm512_add_epi32(_mm512_cvt_roundps_epi32(v, kRne), c.ozp);
  if (rr) {
    const __m512i r = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, rr)), c.rzp);
    __m512 rv = _mm512_mul_ps(_mm512_cvt_roundepi32_ps(r, kRne), c.rm);
    rv = _mm512_min_ps(_mm512_max_ps(rv, c.lo), c.hi);
    q = _mm512_add_epi32(q, _mm512_cvt_roundps_epi32(rv, kRne));
  }
  return q;
}

// NV (<= 4) vectors of 16 consecutive output channels of one row at once, the first `valid` of
// them stored: requantised to int32 per vector, then packed to bytes with
// saturation (exact: qmin >= 0 and qmax <= 255, and the clamp to [qmin, qmax] follows on the
// bytes), and the table and the clamp applied to 64 codes per instruction instead of 16.
QT512 inline void finish_v512(const Epi512& c, const Epilogue& e, int nv, const __m512i* acc, const float* mult,
                              int64_t valid, const uint8_t* rr, uint8_t* o) {
  auto mask16 = [valid](int j) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, valid - j * 16));
    return left == 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
  };
  if (nv == 1) {  // one vector: the 16-code path (packing four would cost more than it saves)
    const __mmask16 m = mask16(0);
    __m512i q = requant_512(c, acc[0], _mm512_loadu_ps(mult), m, rr);
    q = _mm512_min_epi32(_mm512_max_epi32(q, c.qmin), c.qmax);
    __m128i b = _mm512_cvtepi32_epi8(q);
    if (e.lut) b = lut512_apply(c.L, b);
    _mm_mask_storeu_epi8(o, m, b);
    return;
  }
  __m512i q[4];
  for (int j = 0; j < 4; ++j)
    q[j] = j < nv ? requant_512(c, acc[j], _mm512_loadu_ps(mult + j * 16), mask16(j), rr ? rr + j * 16 : nullptr)
                  : _mm512_setzero_si512();
  // packs/packus work per 128-bit lane: lane l holds q0[4l..4l+3], q1[4l..], q2[4l..], q3[4l..];
  // dword k of the result comes from dword 4 * (k % 4) + k / 4
  const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  __m512i b = _mm512_packus_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
  b = _mm512_permutexvar_epi32(idx, b);
  b = _mm512_min_epu8(_mm512_max_epu8(b, c.qmin8), c.qmax8);
  if (e.lut) b = lut512_apply64(c.L, b);
  const int64_t n = std::min<int64_t>(valid, 16 * nv);
  _mm512_mask_storeu_epi8(o, n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1, b);
}

template <int MR, int NJ>
QT512 void tile_512(const PwPrep& p, int64_t panel, const uint8_t* a, int64_t lda, const Epilogue& e,
                    const Residual& res, const uint8_t* rr, uint8_t* out) {
  const int64_t K = p.K, Co = p.Co, kfull = K / 4;
  const int8_t* bp = p.packed + panel * p.K4 * 64;
  const int64_t c0 = panel * 64;
  __m512i acc[MR][NJ];
  for (int j = 0; j < NJ; ++j) {
    const __m512i b = _mm512_loadu_si512(&p.bias[c0 + j * 16]);
    for (int i = 0; i < MR; ++i) acc[i][j] = b;
  }
  for (int64_t kq = 0; kq < kfull; ++kq) {
    __m512i b[NJ];
    for (int j = 0; j < NJ; ++j) b[j] = _mm512_loadu_si512(bp + kq * 256 + j * 64);
    for (int i = 0; i < MR; ++i) {
      const __m512i av = _mm512_set1_epi32(load4(a + i * lda + 4 * kq));
      for (int j = 0; j < NJ; ++j) acc[i][j] = dpbusd512(acc[i][j], av, b[j]);
    }
  }
  if (K & 3) {
    __m512i b[NJ];
    for (int j = 0; j < NJ; ++j) b[j] = _mm512_loadu_si512(bp + kfull * 256 + j * 64);
    for (int i = 0; i < MR; ++i) {
      const __m512i av = _mm512_set1_epi32(load_tail(a + i * lda + 4 * kfull, K & 3));
      for (int j = 0; j < NJ; ++j) acc[i][j] = dpbusd512(acc[i][j], av, b[j]);
    }
  }
  const Epi512 c = epi512(e, res);
  for (int i = 0; i < MR; ++i)
    finish_v512(c, e, NJ, acc[i], &p.mult[c0], Co - c0, rr ? rr + i * Co + c0 : nullptr, out + i * Co + c0);
}

#if EFFOPS_HAS_AMX_ASM
// Rows [0, M) on the AMX tiles (tdpbusd: 16 rows x 64 uint8 of A times 16 quads x 16 channels of
// int8 B, 1024 x 16 multiply-adds per instruction), in blocks of 32 rows x 32 channels: two A
// tiles (straight from the rows with their stride, or from a zero-padded copy for the last rows
// of a call; the K tail past whole 64-k chunks always from a zero-padded copy), two B tiles
// (the level-2 panels [K4 / 4][64][4] read as 16 quads x 64 bytes with a 256-byte stride; the
// last chunk from a zero-padded copy of each panel's tail quads), four int32 tiles, stored to a
// buffer and finished by the AVX-512 epilogue with the bias added there. int32 sums wrap as
// vpdpbusd's do, in any order: the same integers as tile_512.
QT512 void gemm_amx(const PwPrep& p, const uint8_t* a, int64_t lda, int64_t M, const Epilogue& e, const Residual& res,
                    const uint8_t* rr, uint8_t* out) {
  constexpr int64_t R = 32, KC = 64, QB = 256;  // rows per block, k's per chunk, bytes per quad row
  const int64_t K = p.K, Co = p.Co, KQ = p.K4 / 4, kc = (K + KC - 1) / KC, kfull = K / KC;
  thread_local std::vector<int8_t> btail;
  thread_local std::vector<uint8_t> abuf;
  if (kfull < kc) {
    btail.assign(static_cast<size_t>(p.panels * 16 * QB), 0);
    for (int64_t panel = 0; panel < p.panels; ++panel)
      std::memcpy(btail.data() + panel * 16 * QB, p.packed + panel * p.K4 * 64 + kfull * 16 * QB,
                  static_cast<size_t>((KQ - kfull * 16) * QB));
  }
  alignas(64) uint8_t atail[R * KC];
  alignas(64) int32_t cbuf[R * 32];
  const Epi512 c = epi512(e, res);
  tiles::configure();
  for (int64_t m0 = 0; m0 < M; m0 += R) {
    const int mr = static_cast<int>(std::min<int64_t>(R, M - m0));
    const uint8_t* at;
    int64_t as, kf;
    if (mr == R) {
      at = a + m0 * lda, as = lda, kf = kfull;
      if (kf < kc)
        for (int64_t i = 0; i < R; ++i) {
          std::memset(atail + i * KC, 0, KC);
          std::memcpy(atail + i * KC, at + i * lda + kf * KC, static_cast<size_t>(K - kf * KC));
        }
    } else {
      abuf.assign(static_cast<size_t>(R * kc * KC), 0);
      for (int i = 0; i < mr; ++i) std::memcpy(abuf.data() + i * kc * KC, a + (m0 + i) * lda, static_cast<size_t>(K));
      at = abuf.data(), as = kc * KC, kf = kc;
    }
    for (int64_t panel = 0; panel < p.panels; ++panel)
      for (int64_t h = 0; h < 2; ++h) {
        const int64_t c0 = panel * 64 + h * 32;
        if (c0 >= Co) break;
        tiles::zero_block();
        for (int64_t k = 0; k < kc; ++k) {
          const int8_t* bk = k < kfull ? p.packed + panel * p.K4 * 64 + k * 16 * QB : btail.data() + panel * 16 * QB;
          if (k < kf)
            tiles::dot_block<tiles::Dot::kU8S8>(at + k * KC, as, bk + h * 128, QB);
          else
            tiles::dot_block<tiles::Dot::kU8S8>(atail, KC, bk + h * 128, QB);
        }
        tiles::store_block(cbuf);
        const __m512i bias0 = _mm512_loadu_si512(&p.bias[c0]), bias1 = _mm512_loadu_si512(&p.bias[c0 + 16]);
        for (int i = 0; i < mr; ++i) {
          const __m512i acc2[2] = {_mm512_add_epi32(_mm512_loadu_si512(cbuf + i * 32), bias0),
                                   _mm512_add_epi32(_mm512_loadu_si512(cbuf + i * 32 + 16), bias1)};
          finish_v512(c, e, 2, acc2, &p.mult[c0], Co - c0, rr ? rr + (m0 + i) * Co + c0 : nullptr,
                      out + (m0 + i) * Co + c0);
        }
      }
  }
  tiles::release();
}
#endif

template <int MR, int NJ, bool VNNI>
QT256 void tile_256(const PwPrep& p, int64_t panel, const uint8_t* a, int64_t lda, const Epilogue& e,
                    const Residual& res, const uint8_t* rr, uint8_t* out) {
  const int64_t K = p.K, Co = p.Co, kfull = K / 4;
  const int8_t* bp = p.packed + panel * p.K4 * 16;
  const int64_t c0 = panel * 16;
  __m256i acc[MR][NJ];
  for (int j = 0; j < NJ; ++j) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&p.bias[c0 + j * 8]));
    for (int i = 0; i < MR; ++i) acc[i][j] = b;
  }
  // whole quads, then the K tail (one loop with the tail inside kept the accumulators in memory)
  for (int64_t kq = 0; kq < kfull; ++kq) {
    __m256i b[NJ];
    for (int j = 0; j < NJ; ++j) b[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + kq * 64 + j * 32));
    for (int i = 0; i < MR; ++i) {
      const __m256i av = _mm256_set1_epi32(load4(a + i * lda + 4 * kq));
      for (int j = 0; j < NJ; ++j) acc[i][j] = dpbusd256<VNNI>(acc[i][j], av, b[j]);
    }
  }
  if (K & 3) {
    __m256i b[NJ];
    for (int j = 0; j < NJ; ++j)
      b[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + kfull * 64 + j * 32));
    for (int i = 0; i < MR; ++i) {
      const __m256i av = _mm256_set1_epi32(load_tail(a + i * lda + 4 * kfull, K & 3));
      for (int j = 0; j < NJ; ++j) acc[i][j] = dpbusd256<VNNI>(acc[i][j], av, b[j]);
    }
  }
  const __m256i ozp = _mm256_set1_epi32(e.zp), qmin = _mm256_set1_epi32(e.qmin), qmax = _mm256_set1_epi32(e.qmax);
  const __m256 lo = _mm256_set1_ps(-kClamp), hi = _mm256_set1_ps(kClamp);
  const __m256i rzp = _mm256_set1_epi32(res.zp);
  const __m256 rm = _mm256_set1_ps(res.mult);
  for (int j = 0; j < NJ; ++j) {
    const int64_t co = c0 + j * 8;
    if (co >= Co) break;
    const __m256 mult = _mm256_loadu_ps(&p.mult[co]);
    for (int i = 0; i < MR; ++i) {
      if (Co - co < 8) {  // the last few output channels: the scalar epilogue on the accumulators
        alignas(32) int32_t t[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc[i][j]);
        for (int64_t l = 0; l < Co - co; ++l) {
          const int32_t extra = rr ? residual_term(res, rr[i * Co + co + l]) : 0;
          out[i * Co + co + l] = finish(t[l], p.mult[co + l], extra, e);
        }
        continue;
      }
      __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][j]), mult), lo), hi);
      __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_round_ps(v, kRne)), ozp);
      if (rr) {
        const __m256i r = _mm256_sub_epi32(
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rr + i * Co + co))), rzp);
        __m256 rv = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(r), rm), lo), hi);
        q = _mm256_add_epi32(q, _mm256_cvtps_epi32(_mm256_round_ps(rv, kRne)));
      }
      q = _mm256_min_epi32(_mm256_max_epi32(q, qmin), qmax);
      if (!p.lut32.empty()) q = _mm256_i32gather_epi32(p.lut32.data(), q, 4);
      const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i * Co + co), _mm_packus_epi16(w16, w16));
    }
  }
}

using TileFn = void (*)(const PwPrep&, int64_t, const uint8_t*, int64_t, const Epilogue&, const Residual&,
                        const uint8_t*, uint8_t*);
#define QROW512(R) {&tile_512<R, 1>, &tile_512<R, 2>, &tile_512<R, 3>, &tile_512<R, 4>}
const TileFn kTiles512[6][4] = {QROW512(1), QROW512(2), QROW512(3), QROW512(4), QROW512(5), QROW512(6)};
#define QROW256(R, V) {&tile_256<R, 1, V>, &tile_256<R, 2, V>}
const TileFn kTiles256[2][6][2] = {
    {QROW256(1, false), QROW256(2, false), QROW256(3, false), QROW256(4, false), QROW256(5, false), QROW256(6, false)},
    {QROW256(1, true), QROW256(2, true), QROW256(3, true), QROW256(4, true), QROW256(5, true), QROW256(6, true)}};
#undef QROW512
#undef QROW256
#endif

}  // namespace

void gemm_rows(const PwPrep& p, const int8_t* raw, const uint8_t* a, int64_t lda, int64_t M, int32_t,
               const Epilogue& e, const Residual& res, const uint8_t* rr, uint8_t* out) {
#if EFFOPS_X86
#if EFFOPS_HAS_AMX_ASM
  // AMX blocks are 32 channels wide: with 16 or fewer output channels (b0's first projection)
  // half of each tile is padding and the VNNI tiles are faster (8x32x112x112 -> 16: 1.9 vs 1.4 ms)
  if (p.lvl == 2 && ::effops::amx_int8() && p.Co > 16) return gemm_amx(p, a, lda, M, e, res, rr, out);
#endif
  if (p.lvl > 0) {
    constexpr int MR = 6;
    const int64_t lanes = p.lvl == 2 ? 16 : 8;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
      for (int64_t panel = 0; panel < p.panels; ++panel) {
        const int64_t left = p.Co - panel * p.NR;
        const int nj = static_cast<int>(std::min<int64_t>(p.NR / lanes, (left + lanes - 1) / lanes));
        const TileFn fn = p.lvl == 2 ? kTiles512[mr - 1][nj - 1] : kTiles256[p.vnni][mr - 1][nj - 1];
        fn(p, panel, a + m0 * lda, lda, e, res, rr ? rr + m0 * p.Co : nullptr, out + m0 * p.Co);
      }
    }
    return;
  }
#endif
  gemm_scalar(p, raw, a, lda, M, e, res, rr, out);
}

namespace {

// SE gates on the codes of rows [m0, m0 + rows): a = clamp(rne(float(x - zp) * g) + zp, 0, 255).
void gate_rows(int lvl, const uint8_t* x, int64_t m0, int64_t rows, int64_t HW, int64_t C, int32_t zp,
               const float* gate, uint8_t* a);

// Channels [c0, C) of one row of gated codes, the scalar way (the scalar level, the AVX2 tails).
void gate_row_scalar(const uint8_t* x, const float* g, int64_t c0, int64_t C, int32_t zp, uint8_t* a) {
  for (int64_t c = c0; c < C; ++c) {
    const int32_t q = round_scaled(static_cast<int32_t>(x[c]) - zp, g[c]) + zp;
    a[c] = static_cast<uint8_t>(q < 0 ? 0 : (q > 255 ? 255 : q));
  }
}

#if EFFOPS_X86
QT512 void gate_rows_512(const uint8_t* x, int64_t m0, int64_t rows, int64_t HW, int64_t C, int32_t zp,
                         const float* gate, uint8_t* a) {
  const __m512i zv = _mm512_set1_epi32(zp), z = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
  const __m512 lo = _mm512_set1_ps(-kClamp), hi = _mm512_set1_ps(kClamp);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float* g = gate + (m / HW) * C;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 k = C - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (C - c)) - 1);
      const __m512i d = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, x + m * C + c)), zv);
      __m512 v = _mm512_mul_ps(_mm512_cvt_roundepi32_ps(d, kRne), _mm512_maskz_loadu_ps(k, g + c));
      v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
      __m512i q = _mm512_add_epi32(_mm512_cvt_roundps_epi32(v, kRne), zv);
      q = _mm512_min_epi32(_mm512_max_epi32(q, z), top);
      _mm_mask_storeu_epi8(a + r * C + c, k, _mm512_cvtepi32_epi8(q));
    }
  }
}

QT256 void gate_rows_256(const uint8_t* x, int64_t m0, int64_t rows, int64_t HW, int64_t C, int32_t zp,
                         const float* gate, uint8_t* a) {
  const __m256i zv = _mm256_set1_epi32(zp), z = _mm256_setzero_si256(), top = _mm256_set1_epi32(255);
  const __m256 lo = _mm256_set1_ps(-kClamp), hi = _mm256_set1_ps(kClamp);
  const int64_t C8 = C / 8 * 8;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float* g = gate + (m / HW) * C;
    for (int64_t c = 0; c < C8; c += 8) {
      const __m256i d = _mm256_sub_epi32(
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + m * C + c))), zv);
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(g + c));  // exact: |d| < 2^24
      v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);  // NaN -> -2^23 (max returns the second operand)
      __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_round_ps(v, kRne)), zv);
      q = _mm256_min_epi32(_mm256_max_epi32(q, z), top);
      const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(a + r * C + c), _mm_packus_epi16(w16, w16));
    }
    gate_row_scalar(x + m * C, g, C8, C, zp, a + r * C);
  }
}
#endif

void gate_rows(int lvl, const uint8_t* x, int64_t m0, int64_t rows, int64_t HW, int64_t C, int32_t zp,
               const float* gate, uint8_t* a) {
#if EFFOPS_X86
  if (lvl == 2) return gate_rows_512(x, m0, rows, HW, C, zp, gate, a);
  if (lvl == 1) return gate_rows_256(x, m0, rows, HW, C, zp, gate, a);
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    gate_row_scalar(x + m * C, gate + (m / HW) * C, 0, C, zp, a + r * C);
  }
}

}  // namespace
}  // namespace detail

void q_pw(const uint8_t* x, const int8_t* w, int64_t N, int64_t HW, int64_t C, int64_t Co, int32_t x_zp,
          const float* gate, const Epilogue& e, const Residual& res, uint8_t* out, int threads, const uint8_t* blob,
          int64_t blob_size) {
  using namespace detail;
  if (N * HW == 0 || Co == 0) return;  // an empty batch or map: nothing to write
  const int lvl = level();
  const PwPrep p = prep_pw(lvl, w, C, Co, x_zp, e, blob, blob_size);
  const int64_t M = N * HW;
  const int64_t rb = round_up(std::clamp<int64_t>((M + 4 * threads - 1) / (4 * threads), 6, 192), 6);
  const int64_t tasks = (M + rb - 1) / rb;
  std::vector<std::vector<uint8_t>> scratch(static_cast<size_t>(max_workers(tasks, threads)));
  parallel_for(tasks, threads, [&](int64_t t, int worker) {
    const int64_t m0 = t * rb, rows = std::min(rb, M - m0);
    const uint8_t* a = x + m0 * C;
    if (gate) {
      std::vector<uint8_t>& s = scratch[static_cast<size_t>(worker)];
      s.resize(static_cast<size_t>(rb * C));
      gate_rows(lvl, x, m0, rows, HW, C, x_zp, gate, s.data());
      a = s.data();
    }
    gemm_rows(p, w, a, C, rows, x_zp, e, res, res.r ? res.r + m0 * Co : nullptr, out + m0 * Co);
  });
}

void q_dwsep(const uint8_t* x, const int8_t* taps, const DwGeom& g, int32_t x_zp, const Epilogue& mid,
             int32_t mid_zp, const int8_t* pw, int64_t Co, const Epilogue& e, const Residual& res, uint8_t* out, int threads,
             const uint8_t* blob, int64_t blob_size) {
  using namespace detail;
  if (g.N * g.Ho * g.Wo == 0 || Co == 0) return;  // an empty batch: nothing to write
  const int lvl = level();
  const DwPrep dp = prep_dw(lvl, taps, g, x_zp, mid);
  const PwPrep pp = prep_pw(lvl, pw, g.C, Co, mid_zp, e, blob, blob_size);
  // Blocks of output rows whose depthwise result (uint8) stays in L2: <= 64 KiB, >= 4 tasks per thread.
  const int64_t row_bytes = std::max<int64_t>(1, g.Wo * g.C);
  int64_t rb = std::clamp<int64_t>(65536 / row_bytes, 1, g.Ho);
  const int64_t want = 4 * static_cast<int64_t>(threads);
  if (g.N * ((g.Ho + rb - 1) / rb) < want) rb = std::max<int64_t>(1, g.N * g.Ho / want);
  const int64_t blocks = (g.Ho + rb - 1) / rb;
  std::vector<std::vector<uint8_t>> scratch(static_cast<size_t>(max_workers(g.N * blocks, threads)));
  parallel_for(g.N * blocks, threads, [&](int64_t t, int worker) {
    const int64_t n = t / blocks, oh0 = (t % blocks) * rb, oh1 = std::min(g.Ho, oh0 + rb);
    std::vector<uint8_t>& s = scratch[static_cast<size_t>(worker)];
    s.resize(static_cast<size_t>(rb * row_bytes));
    dw_rows(lvl, x + n * g.H * g.W * g.C, taps, dp, g, oh0, oh1, x_zp, mid, s.data(), nullptr);
    const int64_t m0 = (n * g.Ho + oh0) * g.Wo;
    gemm_rows(pp, pw, s.data(), g.C, (oh1 - oh0) * g.Wo, mid_zp, e, res, res.r ? res.r + m0 * Co : nullptr,
              out + m0 * Co);
  });
}

namespace {
// n bytes (n >= 1): two overlapping fixed-size moves for the short spans of a stem's patch rows
// (KW * C = 9 for 3x3 RGB), libc's memcpy otherwise.
inline void copy_span(uint8_t* dst, const uint8_t* src, int64_t n) {
  if (n >= 8 && n <= 16) {
    std::memcpy(dst, src, 8);
    std::memcpy(dst + n - 8, src + n - 8, 8);
  } else if (n >= 4 && n < 8) {
    std::memcpy(dst, src, 4);
    std::memcpy(dst + n - 4, src + n - 4, 4);
  } else {
    std::memcpy(dst, src, static_cast<size_t>(n));
  }
}
}  // namespace

void q_conv(const uint8_t* x, const int8_t* w, const DwGeom& g, int64_t Co, int64_t Kp, int32_t x_zp,
            const Epilogue& e, uint8_t* out, int threads, const uint8_t* blob, int64_t blob_size) {
  using namespace detail;
  if (g.N * g.Ho * g.Wo == 0 || Co == 0) return;  // an empty batch: nothing to write
  const int lvl = level();
  const int64_t span = g.KW * g.C;
  const PwPrep p = prep_pw(lvl, w, Kp, Co, x_zp, e, blob, blob_size);
  const int64_t M = g.N * g.Ho * g.Wo;
  // patch rows per task: whole 6-row tiles, about 32 KiB of patches, >= 4 tasks per thread
  const int64_t want = std::max<int64_t>(6, (M + 4 * threads - 1) / (4 * threads));
  const int64_t rb = round_up(std::clamp<int64_t>(std::min<int64_t>(32768 / Kp, want), 6, 384), 6);
  const int64_t tasks = (M + rb - 1) / rb;
  std::vector<std::vector<uint8_t>> scratch(static_cast<size_t>(max_workers(tasks, threads)));
  const uint8_t zp = static_cast<uint8_t>(x_zp);
  parallel_for(tasks, threads, [&](int64_t t, int worker) {
    const int64_t m0 = t * rb, rows = std::min(rb, M - m0);
    std::vector<uint8_t>& s = scratch[static_cast<size_t>(worker)];
    if (s.empty()) s.assign(static_cast<size_t>(rb * Kp), zp);  // the bytes past K stay x_zp (zero weights)
    int64_t ow = m0 % g.Wo, oh = (m0 / g.Wo) % g.Ho, n = m0 / (g.Wo * g.Ho);
    for (int64_t r = 0; r < rows; ++r) {  // the patch of output pixel m0 + r: [KH][KW][C], padding = x_zp
      const int64_t iw0 = ow * g.sw - g.pl;
      const bool inner_w = iw0 >= 0 && iw0 + g.KW <= g.W;
      uint8_t* dst = s.data() + r * Kp;
      for (int64_t kh = 0; kh < g.KH; ++kh, dst += span) {
        const int64_t ih = oh * g.sh - g.pt + kh;
        if (ih < 0 || ih >= g.H) {
          std::memset(dst, zp, static_cast<size_t>(span));
          continue;
        }
        const uint8_t* src = x + ((n * g.H + ih) * g.W) * g.C;
        if (inner_w) {
          copy_span(dst, src + iw0 * g.C, span);
          continue;
        }
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          const int64_t iw = iw0 + kw;
          if (iw < 0 || iw >= g.W)
            std::memset(dst + kw * g.C, zp, static_cast<size_t>(g.C));
          else
            std::memcpy(dst + kw * g.C, src + iw * g.C, static_cast<size_t>(g.C));
        }
      }
      if (++ow == g.Wo) {
        ow = 0;
        if (++oh == g.Ho) oh = 0, ++n;
      }
    }
    gemm_rows(p, w, s.data(), Kp, rows, x_zp, e, Residual{nullptr, 0, 1.0f}, nullptr, out + m0 * Co);
  });
}

}  // namespace effops::qconv
