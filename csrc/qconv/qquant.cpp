// Float32 -> uint8 activation codes at a float/int8 boundary of a quantized model (the
// quantize_tensor of python/effops/compress/_qmodules.py, one pass instead of five torch ops and
// four float32 temporaries): q = clamp(rne(x / scale) + zp, 0, 255), the division in float32 as
// torch.div does it (not a multiply by 1 / scale, which rounds differently), NaN -> 0 (as the
// torch ops' float -> uint8 conversion gives on x86).
#include <algorithm>
#include <cmath>

#include "common/isa.h"
#include "common/parallel.h"
#include "qconv/qconv_api.h"

#if EFFOPS_X86
#include <immintrin.h>
#endif

namespace effops::qconv {
namespace {

inline uint8_t code_of(float v, float s, float zp) {
  float r = std::nearbyint(v / s) + zp;  // the default rounding mode: half to even
  r = r > 0.0f ? r : 0.0f;                // NaN -> 0
  r = r < 255.0f ? r : 255.0f;
  return static_cast<uint8_t>(r);
}

void quant_scalar(const float* x, uint8_t* q, int64_t n, float s, float zp) {
  for (int64_t i = 0; i < n; ++i) q[i] = code_of(x[i], s, zp);
}

#if EFFOPS_X86
EFFOPS_TARGET_V4 inline __m128i codes16(__m512 v, __m512 vs, __m512 vz) {
  v = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vz), _mm512_setzero_ps()), _mm512_set1_ps(255.0f));  // NaN -> 0
  return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v));
}

EFFOPS_TARGET_V4 void quant_512(const float* x, uint8_t* q, int64_t n, float s, float zp) {
  const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(zp);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m128i a = codes16(_mm512_loadu_ps(x + i), vs, vz), b = codes16(_mm512_loadu_ps(x + i + 16), vs, vz);
    const __m128i c = codes16(_mm512_loadu_ps(x + i + 32), vs, vz), d = codes16(_mm512_loadu_ps(x + i + 48), vs, vz);
    const __m512i all = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(b, a)), _mm256_set_m128i(d, c), 1);
    _mm512_storeu_si512(q + i, all);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
    _mm_mask_storeu_epi8(q + i, m, codes16(_mm512_maskz_loadu_ps(m, x + i), vs, vz));
  }
}

EFFOPS_TARGET_V3 inline __m256i codes8(const float* p, __m256 vs, __m256 vz) {  // 8 int32 in [0, 255]
  __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vz), _mm256_setzero_ps()), _mm256_set1_ps(255.0f));
  return _mm256_cvtps_epi32(v);
}

EFFOPS_TARGET_V3 void quant_256(const float* x, uint8_t* q, int64_t n, float s, float zp) {
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(zp);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    // packs work per 128-bit lane: a b -> a0 b0 a1 b1 (int16), then the two 16-bit vectors -> bytes
    const __m256i ab = _mm256_packs_epi32(codes8(x + i, vs, vz), codes8(x + i + 8, vs, vz));
    const __m256i cd = _mm256_packs_epi32(codes8(x + i + 16, vs, vz), codes8(x + i + 24, vs, vz));
    const __m256i bytes = _mm256_packus_epi16(ab, cd);  // lanes: a0 b0 c0 d0 | a1 b1 c1 d1 (4 bytes each)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  quant_scalar(x + i, q + i, n - i, s, zp);
}
#endif

}  // namespace

void q_quantize_api(const CpuArray& x, const CpuArray& out, double scale, int64_t zp, int threads) {
  const char* op = "q_quantize";
  check(x.ndim() == 1 && out.ndim() == 1 && x.shape(0) == out.shape(0), op,
        ": x and out must be 1-d arrays of one length (the tensors' dense storage)");
  check_dtype(x, nb::dtype<float>(), op, "x");
  check_dtype(out, nb::dtype<uint8_t>(), op, "out");
  check(zp >= 0 && zp <= 255, op, ": zp must be a code in [0, 255], got ", zp);
  const float s = static_cast<float>(scale);
  check(std::isfinite(s) && s > 0.0f, op, ": scale must be a positive finite float32, got ", scale);
  const float* xp = data_of<const float>(x);
  uint8_t* qp = data_of<uint8_t>(out);
  const int64_t n = static_cast<int64_t>(x.shape(0));
  constexpr int64_t kChunk = 1 << 16;  // elements per task
  const int64_t tasks = (n + kChunk - 1) / kChunk;
  const Isa level = isa();
  parallel_for(tasks, threads, [&](int64_t t, int) {
    const int64_t i0 = t * kChunk, len = std::min(kChunk, n - i0);
#if EFFOPS_X86
    if (level >= kV4) return quant_512(xp + i0, qp + i0, len, s, static_cast<float>(zp));
    if (level >= kV3) return quant_256(xp + i0, qp + i0, len, s, static_cast<float>(zp));
#endif
    quant_scalar(xp + i0, qp + i0, len, s, static_cast<float>(zp));
  });
}

}  // namespace effops::qconv
