// BiFPN weighted fusion on CUDA: one thread per output element (channels fastest, so NHWC loads
// coalesce); inputs read through their resample modes. Backward mirrors the CPU/Triton kernels:
// g * act'(pre) with per-block weight-gradient partials (no atomics), then per-input gathers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "bifpn/fuse.cuh"
#include "common/cuda_check.h"
#include "common/float_math.cuh"

namespace effops::cuda::bifpn {
namespace {


__device__ __forceinline__ int64_t nearest_src(int64_t dst, float scale, int64_t n_in) {
  const int64_t s = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return s < n_in - 1 ? s : n_in - 1;
}

template <class T>
__device__ float sample(const FuseIn& in, int64_t C, int64_t n, int64_t oh, int64_t ow, int64_t c) {
  const T* x = static_cast<const T*>(in.x);
  if (in.mode == 0) return to_f(x[((n * in.H + oh) * in.W + ow) * C + c]);
  if (in.mode == 1) {
    const int64_t ih = nearest_src(oh, in.sh, in.H), iw = nearest_src(ow, in.sw, in.W);
    return to_f(x[((n * in.H + ih) * in.W + iw) * C + c]);
  }
  float m = -INFINITY;
  for (int dh = 0; dh < 3; ++dh) {
    const int64_t h = 2 * oh - in.pt + dh;
    if (h < 0 || h >= in.H) continue;
    for (int dw = 0; dw < 3; ++dw) {
      const int64_t w = 2 * ow - in.pl + dw;
      if (w < 0 || w >= in.W) continue;
      const float v = to_f(x[((n * in.H + h) * in.W + w) * C + c]);
      if (v > m || v != v) m = v;
    }
  }
  return m;
}

template <class T>
__global__ void __launch_bounds__(kFuseThreads) fuse_kernel(FuseArgs a, T* __restrict__ out) {
  const int64_t total = a.N * a.Ho * a.Wo * a.C;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e % a.C, p = e / a.C;
    const int64_t n = p / (a.Ho * a.Wo), oh = (p / a.Wo) % a.Ho, ow = p % a.Wo;
    float pre = 0.f;
    for (int i = 0; i < a.k; ++i) pre += a.w[i] * sample<T>(a.in[i], a.C, n, oh, ow, c);
    out[e] = from_f<T>(act_fn(pre, a.act));
  }
}

template <class T>
__global__ void __launch_bounds__(kFuseThreads)
    fuse_pre_kernel(FuseArgs a, const float* __restrict__ g, float* __restrict__ gpre, float* __restrict__ part) {
  __shared__ float red[4][kFuseThreads];
  const int64_t total = a.N * a.Ho * a.Wo * a.C;
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (e < total) {
    const int64_t c = e % a.C, p = e / a.C;
    const int64_t n = p / (a.Ho * a.Wo), oh = (p / a.Wo) % a.Ho, ow = p % a.Wo;
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    float pre = 0.f;
    for (int i = 0; i < a.k; ++i) {
      v[i] = sample<T>(a.in[i], a.C, n, oh, ow, c);
      pre += a.w[i] * v[i];
    }
    const float gp = g[e] * act_grad(pre, a.act);
    gpre[e] = gp;
    for (int i = 0; i < a.k; ++i) acc[i] = gp * v[i];
  }
  for (int i = 0; i < 4; ++i) red[i][threadIdx.x] = acc[i];
  __syncthreads();
  for (int s = kFuseThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s)
      for (int i = 0; i < 4; ++i) red[i][threadIdx.x] += red[i][threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x < 4) part[blockIdx.x * 4 + threadIdx.x] = red[threadIdx.x][0];
}

template <class T>
__global__ void __launch_bounds__(kFuseThreads)
    gather_kernel(FuseArgs a, int i, const float* __restrict__ gpre, float* __restrict__ gx) {
  const FuseIn in = a.in[i];
  const T* x = static_cast<const T*>(in.x);
  const float w = a.w[i];
  const int64_t total = a.N * in.H * in.W * a.C;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e % a.C, q = e / a.C;
    const int64_t n = q / (in.H * in.W), h = (q / in.W) % in.H, xx = q % in.W;
    float acc = 0.f;
    if (in.mode == 1) {
      // output rows oh with nearest_src(oh) == h lie from about h / sh; each is checked exactly
      const int64_t oh0 = max(static_cast<int64_t>(floorf(h / in.sh)) - 1, int64_t(0));
      const int64_t ow0 = max(static_cast<int64_t>(floorf(xx / in.sw)) - 1, int64_t(0));
      for (int64_t oh = oh0; oh < a.Ho && nearest_src(oh, in.sh, in.H) <= h; ++oh) {
        if (nearest_src(oh, in.sh, in.H) != h) continue;
        for (int64_t ow = ow0; ow < a.Wo && nearest_src(ow, in.sw, in.W) <= xx; ++ow)
          if (nearest_src(ow, in.sw, in.W) == xx) acc += gpre[((n * a.Ho + oh) * a.Wo + ow) * a.C + c];
      }
    } else {
      for (int i2 = 0; i2 < 2; ++i2)
        for (int j2 = 0; j2 < 2; ++j2) {
          const int64_t oh = (h + in.pt) / 2 - i2, ow = (xx + in.pl) / 2 - j2;
          if (oh < 0 || oh >= a.Ho || ow < 0 || ow >= a.Wo) continue;
          const int64_t wh0 = 2 * oh - in.pt, ww0 = 2 * ow - in.pl;
          if (h < wh0 || h > wh0 + 2 || xx < ww0 || xx > ww0 + 2) continue;
          float best = -INFINITY;
          int64_t ah = wh0, aw = ww0;  // torch: the first window position until a value wins
          for (int dh = 0; dh < 3; ++dh)
            for (int dw = 0; dw < 3; ++dw) {
              const int64_t hh = wh0 + dh, ww = ww0 + dw;
              if (hh < 0 || hh >= in.H || ww < 0 || ww >= in.W) continue;
              const float v = to_f(x[((n * in.H + hh) * in.W + ww) * a.C + c]);
              if (v > best || v != v) best = v, ah = hh, aw = ww;
            }
          if (ah == h && aw == xx) acc += gpre[((n * a.Ho + oh) * a.Wo + ow) * a.C + c];
        }
    }
    gx[e] = w * acc;
  }
}

unsigned blocks_for(int64_t total) {
  const int64_t b = (total + kFuseThreads - 1) / kFuseThreads;
  return static_cast<unsigned>(b < 65535 * 16 ? b : 65535 * 16);
}

}  // namespace

template <class T>
void fuse_forward(const FuseArgs& a, T* out, cudaStream_t stream) {
  const int64_t total = a.N * a.Ho * a.Wo * a.C;
  if (total == 0) return;
  fuse_kernel<T><<<blocks_for(total), kFuseThreads, 0, stream>>>(a, out);
  check_launch("weighted_fuse kernel");
}

template <class T>
void fuse_backward_pre(const FuseArgs& a, const float* g, float* gpre, float* part, int64_t blocks,
                       cudaStream_t stream) {
  if (blocks == 0) return;
  fuse_pre_kernel<T><<<static_cast<unsigned>(blocks), kFuseThreads, 0, stream>>>(a, g, gpre, part);
  check_launch("weighted_fuse backward kernel");
}

template <class T>
void fuse_backward_gather(const FuseArgs& a, int i, const float* gpre, float* gx, cudaStream_t stream) {
  const int64_t total = a.N * a.in[i].H * a.in[i].W * a.C;
  if (total == 0) return;
  gather_kernel<T><<<blocks_for(total), kFuseThreads, 0, stream>>>(a, i, gpre, gx);
  check_launch("weighted_fuse gather kernel");
}

#define EFFOPS_FUSE_INSTANTIATE(T)                                                                \
  template void fuse_forward<T>(const FuseArgs&, T*, cudaStream_t);                              \
  template void fuse_backward_pre<T>(const FuseArgs&, const float*, float*, float*, int64_t,      \
                                     cudaStream_t);                                              \
  template void fuse_backward_gather<T>(const FuseArgs&, int, const float*, float*, cudaStream_t);
EFFOPS_FUSE_INSTANTIATE(float)
EFFOPS_FUSE_INSTANTIATE(__half)
EFFOPS_FUSE_INSTANTIATE(__nv_bfloat16)

}  // namespace effops::cuda::bifpn
