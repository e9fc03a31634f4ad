// Int8 fused convolutions on the CPU (the qconv family). python/effops/ops/qconv.py defines the
// arithmetic; these kernels give the same integers bit for bit:
//   acc = wrap32(sum (x - x_zp) * w + bias)                           int32
//   q   = clamp(rne(clamp(float(acc) * mult[c], +-2^23)) + extra + zp, qmin, qmax);  out = lut ? lut[q] : q
// Activations are NHWC uint8 with a per-tensor zero point, weights int8 per output channel.
//
// Levels, picked at run time (common/isa.h; EFFOPS_ISA caps them): 2 = AVX-512 VNNI + VBMI
// (vpdpbusd / vpdpwssd on zmm, vpermi2b tables; with x86-64-v4), 1 = AVX-VNNI (the VEX forms on
// ymm, with x86-64-v3), 0 = the exact scalar integer code.
#pragma once
#include <cstdint>

namespace effops::qconv {

// The requantising epilogue of one output tensor.
struct Epilogue {
  const int32_t* bias;  // [C] or null
  const float* mult;    // [C]
  const uint8_t* lut;   // [256] or null
  int32_t zp, qmin, qmax;
};

// A residual added in the integer domain: extra = rne(clamp(float(r - zp) * mult)). r null: none.
struct Residual {
  const uint8_t* r;
  int32_t zp;
  float mult;
};

struct DwGeom {
  int64_t N, H, W, C, KH, KW, sh, sw, pt, pl, Ho, Wo;
};

int level();
const char* level_name(int level);

// y [N, Ho, Wo, C]; sums [N, C] (int32 sums of the output codes) or null.
void q_dw(const uint8_t* x, const int8_t* taps, const DwGeom& g, int32_t x_zp, const Epilogue& e, uint8_t* y,
          int32_t* sums, int threads);
// out [N * HW, Co] = requant(x [N * HW, C] . w[Co, C]^T); gate [N, C] float or null (SE). blob:
// the weights packed by q_pw_pack (used when it matches the level, shape and zero point) or null.
void q_pw(const uint8_t* x, const int8_t* w, int64_t N, int64_t HW, int64_t C, int64_t Co, int32_t x_zp,
          const float* gate, const Epilogue& e, const Residual& res, uint8_t* out, int threads,
          const uint8_t* blob = nullptr, int64_t blob_size = 0);
// Depthwise (requantised to uint8 with mid) then pointwise, per block of output rows in cache;
// mid_zp: the zero point of the mid codes the pointwise conv reads (mid.zp is the depthwise
// epilogue's, the pre-activation's when mid has a lut).
void q_dwsep(const uint8_t* x, const int8_t* taps, const DwGeom& g, int32_t x_zp, const Epilogue& mid,
             int32_t mid_zp, const int8_t* pw, int64_t Co, const Epilogue& e, const Residual& res, uint8_t* out, int threads,
             const uint8_t* blob = nullptr, int64_t blob_size = 0);

// A dense conv (groups 1) as patches and the pointwise GEMM: out [N, Ho, Wo, Co] from x [N, H, W, C]
// and w [Co, Kp] (taps in (kh, kw, c) order, Kp >= KH * KW * C: the weights past the taps are zero,
// a multiple of 4 keeps the GEMM off its K-tail path); padding reads x_zp (the zero's code).
// Patches of a block of output pixels are built in cache, never the whole im2col matrix.
void q_conv(const uint8_t* x, const int8_t* w, const DwGeom& g, int64_t Co, int64_t Kp, int32_t x_zp,
            const Epilogue& e, uint8_t* out, int threads, const uint8_t* blob = nullptr, int64_t blob_size = 0);

// Squeeze-excite gates [N, C] float32 from the int32 channel sums [N, C] of a depthwise output
// over hw pixels (qse.cpp; q_se_gates defines them): w1 [R, C], b1 [R] or null, act an activation
// code, w2 [C, R], b2 [C] or null, gate kGateSigmoid or kGateHardSigmoid.
constexpr int kGateSigmoid = 5, kGateHardSigmoid = 6;  // simd::kSigmoid, BlockPlan::kGateHardSigmoid
void se_gates(const int32_t* sums, int64_t N, int64_t C, int64_t hw, int64_t zp, double scale, const float* w1,
              const float* b1, int64_t R, int act, const float* w2, const float* b2, int gate, float* out);

}  // namespace effops::qconv
