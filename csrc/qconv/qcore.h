// Shared pieces of the qconv CPU kernels: the scalar requantisation (the definition the SIMD
// code reproduces), level target attributes, and the internal entry points shared by the
// depthwise, pointwise and fused drivers.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/isa.h"
#include "qconv/qconv.h"

#if EFFOPS_X86
#include <immintrin.h>
#define QT512 __attribute__((target("arch=x86-64-v4,avx512vnni,avx512vbmi")))
// Level 1 is plain AVX2 (x86-64-v3): the AVX-VNNI instructions are inline assembly chosen at run
// time (dpbusd256 / dpwssd256 <true>), so the compiler never emits them for the CPUs without.
#define QT256 __attribute__((target("arch=x86-64-v3")))
#define EFFOPS_QLAMBDA __attribute__((always_inline, target("arch=x86-64-v4,avx512vnni,avx512vbmi")))
#define EFFOPS_QLAMBDA256 __attribute__((always_inline, target("arch=x86-64-v3")))
#endif

namespace effops::qconv::detail {

constexpr float kClamp = 8388608.0f;  // 2^23
#if EFFOPS_X86
constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// acc += the dot products of 4 unsigned bytes of a with 4 signed bytes of b per int32 lane
// (vpdpbusd), written as asm: with the intrinsic GCC 12 copies the accumulator into a scratch
// register and back around every instruction and spills a 6 x 4 tile to the stack (twice the
// instructions of the loop); the asm keeps each accumulator in its register.
QT512 inline __m512i dpbusd512(__m512i acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
// VNNI: AVX-VNNI's vpdpbusd; else the same integers from AVX2: the even and the odd bytes as int16
// (a zero-extended, b sign-extended), two vpmaddwd (|a * b| * 2 < 2^16: no saturation), added.
template <bool VNNI>
QT256 inline __m256i dpbusd256(__m256i acc, __m256i a, __m256i b) {
  if constexpr (VNNI) {
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
    return acc;
  } else {
    const __m256i ae = _mm256_and_si256(a, _mm256_set1_epi16(0x00ff)), ao = _mm256_srli_epi16(a, 8);
    const __m256i be = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8), bo = _mm256_srai_epi16(b, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(ae, be), _mm256_madd_epi16(ao, bo)));
  }
}
// pairs of int16 (vpdpwssd; else vpmaddwd + vpaddd: the same non-saturating sum)
template <bool VNNI>
QT256 inline __m256i dpwssd256(__m256i acc, __m256i a, __m256i b) {
  if constexpr (VNNI) {
    __asm__("%{vex%} vpdpwssd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
    return acc;
  } else {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
  }
}
#endif

inline int32_t wadd(int32_t a, int32_t b) {  // int32 addition with two's complement wrap-around
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}

// rne(clamp(float(v) * m, +-2^23)). The product is never fused with an add (there is none);
// NaN (a NaN multiplier) clamps to -2^23 like the SIMD max/min do.
inline int32_t round_scaled(int32_t v, float m) {
  float p = static_cast<float>(v) * m;
  p = p > -kClamp ? p : -kClamp;
  p = p < kClamp ? p : kClamp;
  return static_cast<int32_t>(std::nearbyint(p));
}

inline uint8_t finish(int32_t acc, float m, int32_t extra, const Epilogue& e) {
  int32_t q = round_scaled(acc, m) + extra + e.zp;
  q = q < e.qmin ? e.qmin : (q > e.qmax ? e.qmax : q);
  return e.lut ? e.lut[q] : static_cast<uint8_t>(q);
}

inline int32_t residual_term(const Residual& r, uint8_t v) {
  return round_scaled(static_cast<int32_t>(v) - r.zp, r.mult);
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

#if EFFOPS_X86
// The 256-entry activation table in four zmm registers, applied to 16 byte codes with two
// vpermi2b (128 entries each, the index's low 7 bits) and a blend on the index's top bit: 3
// instructions per 16 outputs, where a 16-lane gather costs tens of cycles.
struct Lut512 {
  __m512i t0, t1, t2, t3;
};
QT512 inline Lut512 lut512_load(const uint8_t* lut) {
  return {_mm512_loadu_si512(lut), _mm512_loadu_si512(lut + 64), _mm512_loadu_si512(lut + 128),
          _mm512_loadu_si512(lut + 192)};
}
QT512 inline __m128i lut512_apply(const Lut512& L, __m128i codes) {
  const __m512i idx = _mm512_castsi128_si512(codes);
  const __m512i lo = _mm512_permutex2var_epi8(L.t0, idx, L.t1);
  const __m512i hi = _mm512_permutex2var_epi8(L.t2, idx, L.t3);
  return _mm512_castsi512_si128(_mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi));
}
// The table on 64 codes at once.
QT512 inline __m512i lut512_apply64(const Lut512& L, __m512i codes) {
  const __m512i lo = _mm512_permutex2var_epi8(L.t0, codes, L.t1);
  const __m512i hi = _mm512_permutex2var_epi8(L.t2, codes, L.t3);
  return _mm512_mask_blend_epi8(_mm512_movepi8_mask(codes), lo, hi);
}
#endif

// Depthwise weights in the kernels' layouts, made once per call.
struct DwPrep {
  int64_t Cp = 0;                 // C rounded up to 16
  std::vector<int32_t> taps32;    // [KH * KW][Cp]: w as the low int16 of an int32 lane (high half 0)
  int64_t NG = 0;                 // groups of 4 taps per kernel row: (KW + 3) / 4
  std::vector<int32_t> quads;     // [KH * NG][Cp]: taps kw = 4q..4q+3 of row kh as 4 int8 bytes (0 past KW)
  std::vector<int32_t> bias;      // [Cp] bias (0 when none)
  std::vector<int32_t> bias_int;  // [Cp] bias - x_zp * sum of the taps (interior pixels)
  std::vector<float> mult;        // [Cp]
  std::vector<int32_t> lut32;     // [256] or empty
  bool quad = false;              // the quad-row kernels (the decision dw_rows follows)
};
// lvl: the kernel level the prep is for; quad: the quad-row kernels run (levels 1 and 2, rings up
// to kQuadRingMax), with quads; taps32: level 1 without them; lut32: level 1.
DwPrep prep_dw(int lvl, const int8_t* taps, const DwGeom& g, int32_t x_zp, const Epilogue& e);

// Output rows [oh0, oh1) of image xi (its [H, W, C] codes) into y (row-major, C per pixel);
// sums [C] accumulates the output codes when not null.
void dw_rows(int lvl, const uint8_t* xi, const int8_t* taps, const DwPrep& p, const DwGeom& g, int64_t oh0,
             int64_t oh1, int32_t x_zp, const Epilogue& e, uint8_t* y, int32_t* sums);

// Pointwise weights packed for the level's tile, with the zero-point correction in the bias;
// packed / bias point into the own_* vectors or into a blob made by q_pw_pack (kept by the caller).
struct PwPrep {
  int lvl = 0;
  bool vnni = false;  // level 1: AVX-VNNI (else the AVX2 emulation)
  int64_t K = 0, Co = 0, NR = 0, K4 = 0, panels = 0;
  const int8_t* packed = nullptr;  // [panels][K4 / 4][NR][4]
  const int32_t* bias = nullptr;   // [panels * NR] bias - x_zp * sum_k w
  std::vector<int8_t> own_packed;
  std::vector<int32_t> own_bias;
  std::vector<float> mult;         // [panels * NR]
  std::vector<int32_t> lut32;      // [256] or empty
};
// blob: a q_pw_pack result for this level / shape / zero point / bias presence, or null.
PwPrep prep_pw(int lvl, const int8_t* w, int64_t K, int64_t Co, int32_t x_zp, const Epilogue& e,
               const uint8_t* blob, int64_t blob_bytes);

// The blob: int64 header {kBlobMagic, level, Co, K, NR, x_zp, has_bias, 0}, int32 bias [Cop],
// int8 packed weights [Cop * K4], Cop = Co rounded up to 64 (the widest panel).
constexpr int64_t kBlobMagic = 0x316b63617071LL;  // "qpack1"
inline int64_t blob_bytes(int64_t Co, int64_t K) {
  const int64_t cop = round_up(Co, 64);
  return 64 + 4 * cop + cop * round_up(K, 4);
}
void pack_blob(int lvl, const int8_t* w, int64_t K, int64_t Co, int32_t x_zp, const int32_t* bias, uint8_t* blob);

// rows [0, M) of A (row stride lda) times the packed weights, epilogue, into out (row stride
// Co); res (row stride Co) when not null. raw: the unpacked weights (scalar level).
void gemm_rows(const PwPrep& p, const int8_t* raw, const uint8_t* a, int64_t lda, int64_t M, int32_t x_zp,
               const Epilogue& e, const Residual& res, const uint8_t* res_rows, uint8_t* out);

}  // namespace effops::qconv::detail
