// CUDA kernels of the depthwise-separable family (NHWC; semantics in python/effops/ops/dwsep.py).
// T: float, __half or __nv_bfloat16 storage; weights, per-channel vectors, accumulation float.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace effops::cuda::dwsep {

struct Geom {
  int64_t N, H, W, C, Ho, Wo, KH, KW, sh, sw, pt, pl, dh, dw;
};

// out[n, oh, ow, co]: the fused depthwise -> pointwise conv (see dwsep_conv).
template <class T>
void dwsep_forward(const T* x, const float* taps, const float* pw, const float* dws,
                   const float* dwb, const float* pws, const float* pwb, const T* res,
                   const Geom& g, int64_t Co, int act, int pw_act, bool preact, T* out,
                   cudaStream_t stream);

// y = act(depthwise(x) * s + b); part[n, block, c] = sum of y over the block's pixels.
template <class T>
void dw_forward(const T* x, const float* taps, const float* s, const float* b, const Geom& g,
                int act, T* y, float* part, int64_t pblocks, cudaStream_t stream);

// out[m, co] = act((sum_c a[m, c] * cs[m / hw, c] * w[co, c]) * s[co] + b[co]) + res[m, co].
template <class T>
void pw_forward(const T* a, const float* w, const T* cs, const float* s, const float* b, int act,
                const T* res, T* out, int64_t M, int64_t hw, int64_t C, int64_t Co,
                cudaStream_t stream);

// Backward of the raw depthwise conv (float32): ga [N, H, W, C]; part [pblocks, KH*KW, C] whose
// sum over blocks is the weight gradient.
void dw_backward(const float* a, const float* taps, const float* gd, const Geom& g, float* ga,
                 float* part, int64_t pblocks, cudaStream_t stream);

// Pixels per block of dw_forward / dw_backward's weight pass (callers size part with it).
constexpr int64_t kDwPixels = 64;

}  // namespace effops::cuda::dwsep
