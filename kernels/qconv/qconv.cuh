// CUDA kernels of the int8 convolutions (NHWC uint8; arithmetic in python/effops/ops/qconv.py).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace effops::cuda::qconv {

struct QGeom {
  int64_t N, H, W, C, KH, KW, sh, sw, pt, pl, Ho, Wo;
};

// The requantising epilogue (see the Python docstring).
struct QEpi {
  const int32_t* bias;  // or null
  const float* mult;
  const uint8_t* lut;   // or null
  int zp, qmin, qmax;
};

// y [N, Ho, Wo, C]; sums [N, C] (zeroed and accumulated here).
void q_dw_forward(const uint8_t* x, const int8_t* taps, const QGeom& g, int x_zp, const QEpi& e, uint8_t* y,
                  int32_t* sums, cudaStream_t stream);
// out [M, Co] from x [M, K] and w [Co, K]; gate [M / HW, K] or null; res [M, Co] or null.
void q_pw_forward(const uint8_t* x, const int8_t* w, int64_t M, int64_t HW, int64_t K, int64_t Co, int x_zp,
                  const float* gate, const QEpi& e, const uint8_t* res, int res_zp, float res_mult, uint8_t* out,
                  cudaStream_t stream);

}  // namespace effops::cuda::qconv
