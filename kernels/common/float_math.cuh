// Device helpers shared by the CUDA kernel families: storage <-> float conversion for
// float / __half / __nv_bfloat16, and the activations of effops.ops.dwsep.ACTIVATIONS
// (codes 0 none, 1 relu, 2 relu6, 3 silu, 4 hardswish, 5 sigmoid) with their derivatives.
// Comparisons keep NaN and the derivatives at the kinks follow PyTorch, as the CPU kernels do.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace effops::cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float act_fn(float x, int act) {
  switch (act) {
    case 1: return x < 0.f ? 0.f : x;
    case 2: return x < 0.f ? 0.f : (x > 6.f ? 6.f : x);
    case 3: return x / (1.f + expf(-x));
    case 4: {
      float t = x + 3.f;
      t = t < 0.f ? 0.f : (t > 6.f ? 6.f : t);
      return x * t * (1.f / 6.f);
    }
    case 5: return 1.f / (1.f + expf(-x));
    default: return x;
  }
}

__device__ __forceinline__ float act_grad(float x, int act) {
  switch (act) {
    case 1: return x > 0.f ? 1.f : 0.f;
    case 2: return (x > 0.f && x < 6.f) ? 1.f : 0.f;
    case 3: {
      const float s = 1.f / (1.f + expf(-x));
      return s * (1.f + x * (1.f - s));
    }
    case 4: return x < -3.f ? 0.f : (x <= 3.f ? x / 3.f + 0.5f : 1.f);
    case 5: {
      const float s = 1.f / (1.f + expf(-x));
      return s * (1.f - s);
    }
    default: return 1.f;
  }
}

}  // namespace effops::cuda
