// CUDA kernels of the BiFPN weighted fusion (NHWC; semantics in python/effops/ops/bifpn.py).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace effops::cuda::bifpn {

struct FuseIn {
  const void* x;  // [N, H, W, C], the storage type of the call
  int64_t H, W;
  int mode;        // 0 identity, 1 nearest, 2 max pool (pads pt, pl)
  float sh, sw;    // nearest: float(H) / Ho, float(W) / Wo (ATen's rule)
  int64_t pt, pl;  // pool padding
};

struct FuseArgs {
  FuseIn in[4];
  int k;
  const float* w;  // normalised weights [k]
  int64_t N, C, Ho, Wo;
  int act;
};

template <class T>
void fuse_forward(const FuseArgs& a, T* out, cudaStream_t stream);

// gpre = g * act'(pre) (float32 [N, Ho, Wo, C]); part [blocks, 4]: per-block weight gradients.
template <class T>
void fuse_backward_pre(const FuseArgs& a, const float* g, float* gpre, float* part, int64_t blocks,
                       cudaStream_t stream);

// gx (float32 [N, H, W, C]) of input i (nearest or pool) gathered from gpre, times w[i].
template <class T>
void fuse_backward_gather(const FuseArgs& a, int i, const float* gpre, float* gx, cudaStream_t stream);

constexpr int kFuseThreads = 256;

}  // namespace effops::cuda::bifpn
