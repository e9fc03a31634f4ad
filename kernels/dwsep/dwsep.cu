// CUDA kernels of the depthwise-separable family. Same tiling and index math as the Triton
// kernels (python/effops/triton/dwsep.py), written as plain SIMT tiles:
//  * dwsep_kernel: a block computes 32 output pixels x 64 output channels. For each chunk of 32
//    input channels it computes the depthwise tile into shared memory, loads the matching
//    pointwise weights, and accumulates a 2 x 4 register tile per thread. The depthwise result
//    never goes to global memory.
//  * dw_kernel: threads across channels (coalesced NHWC), a block per (image, 64 pixels, 64
//    channels); per-block SE partial sums (no atomics: deterministic).
//  * pw_kernel: a 64 x 64 tiled GEMM with 4 x 4 register tiles; the SE channel scale is applied
//    while loading A.
//  * dw_bwd_input_kernel (gather) and dw_bwd_weight_kernel (per-block partials per tap).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_check.h"
#include "common/float_math.cuh"
#include "dwsep/dwsep.cuh"

namespace effops::cuda::dwsep {
namespace {


// The pointwise GEMM's epilogue for output channel co at out[e]: per-channel affine (scale,
// bias may be null), activation, residual, store in T.
template <class T>
__device__ __forceinline__ void store_epilogue(float v, int64_t co, const float* __restrict__ scale,
                                               const float* __restrict__ bias, int act,
                                               const T* __restrict__ res, T* __restrict__ out, int64_t e) {
  if (scale) v *= scale[co];
  if (bias) v += bias[co];
  v = act_fn(v, act);
  if (res) v += to_f(res[e]);
  out[e] = from_f<T>(v);
}

// Raw depthwise value of output pixel p (flattened n, oh, ow), channel c.
template <class T>
__device__ __forceinline__ float dw_value(const T* __restrict__ x, const float* __restrict__ taps,
                                          const Geom& g, int64_t p, int64_t c, int in_act) {
  const int64_t n = p / (g.Ho * g.Wo), rem = p % (g.Ho * g.Wo);
  const int64_t oh = rem / g.Wo, ow = rem % g.Wo;
  float a = 0.f;
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    const int64_t ih = oh * g.sh - g.pt + kh * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const int64_t iw = ow * g.sw - g.pl + kw * g.dw;
      if (iw < 0 || iw >= g.W) continue;
      float xv = to_f(x[((n * g.H + ih) * g.W + iw) * g.C + c]);
      if (in_act) xv = act_fn(xv, in_act);
      a += xv * taps[(kh * g.KW + kw) * g.C + c];
    }
  }
  return a;
}

constexpr int kTP = 32, kTO = 64, kTC = 32;

template <class T>
__global__ void __launch_bounds__(256)
    dwsep_kernel(const T* __restrict__ x, const float* __restrict__ taps,
                 const float* __restrict__ pw, const float* __restrict__ dws,
                 const float* __restrict__ dwb, const float* __restrict__ pws,
                 const float* __restrict__ pwb, const T* __restrict__ res, T* __restrict__ out,
                 Geom g, int64_t Co, int act, int pw_act, bool preact) {
  __shared__ float dwt[kTP][kTC + 1];
  __shared__ float wt[kTC][kTO + 1];
  const int64_t NP = g.N * g.Ho * g.Wo;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTP;
  const int64_t co0 = static_cast<int64_t>(blockIdx.y) * kTO;
  const int tid = threadIdx.x;
  const int tp = (tid / 16) * 2, to = (tid % 16) * 4;
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  for (int64_t c0 = 0; c0 < g.C; c0 += kTC) {
    for (int e = tid; e < kTP * kTC; e += 256) {
      const int pi = e / kTC, ci = e % kTC;
      const int64_t p = p0 + pi, c = c0 + ci;
      float v = 0.f;
      if (p < NP && c < g.C) {
        v = dw_value(x, taps, g, p, c, preact ? act : 0);
        if (dws) v *= dws[c];
        if (dwb) v += dwb[c];
        if (!preact) v = act_fn(v, act);
      }
      dwt[pi][ci] = v;
    }
    for (int e = tid; e < kTC * kTO; e += 256) {
      const int ci = e % kTC, oi = e / kTC;
      const int64_t c = c0 + ci, co = co0 + oi;
      wt[ci][oi] = (c < g.C && co < Co) ? pw[co * g.C + c] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int ci = 0; ci < kTC; ++ci) {
      const float a0 = dwt[tp][ci], a1 = dwt[tp + 1][ci];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float b = wt[ci][to + j];
        acc[0][j] += a0 * b;
        acc[1][j] += a1 * b;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t p = p0 + tp + i;
    if (p >= NP) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t co = co0 + to + j;
      if (co >= Co) continue;
      store_epilogue(acc[i][j], co, pws, pwb, pw_act, res, out, p * Co + co);
    }
  }
}

constexpr int kDC = 64, kLanes = 4;

template <class T>
__global__ void __launch_bounds__(kDC* kLanes)
    dw_kernel(const T* __restrict__ x, const float* __restrict__ taps, const float* __restrict__ s,
              const float* __restrict__ b, Geom g, int act, T* __restrict__ y,
              float* __restrict__ part) {
  __shared__ float red[kLanes][kDC];
  const int64_t n = blockIdx.x, pb = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.z) * kDC + threadIdx.x;
  const int64_t HWo = g.Ho * g.Wo;
  float sum = 0.f;
  if (c < g.C) {
    for (int64_t pi = threadIdx.y; pi < kDwPixels; pi += kLanes) {
      const int64_t q = pb * kDwPixels + pi;
      if (q >= HWo) break;
      float v = dw_value(x, taps, g, n * HWo + q, c, 0);
      if (s) v *= s[c];
      if (b) v += b[c];
      v = act_fn(v, act);
      y[(n * HWo + q) * g.C + c] = from_f<T>(v);
      sum += v;
    }
  }
  red[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < g.C) {
    float t = 0.f;
    for (int l = 0; l < kLanes; ++l) t += red[l][threadIdx.x];
    part[(n * gridDim.y + pb) * g.C + c] = t;
  }
}

constexpr int kTM = 64, kTN = 64, kTK = 16;

template <class T>
__global__ void __launch_bounds__(256)
    pw_kernel(const T* __restrict__ a, const float* __restrict__ w, const T* __restrict__ cs,
              const float* __restrict__ s, const float* __restrict__ b, int act,
              const T* __restrict__ res, T* __restrict__ out, int64_t M, int64_t hw, int64_t C,
              int64_t Co) {
  __shared__ float As[kTK][kTM + 1];
  __shared__ float Ws[kTK][kTN + 1];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTN;
  const int tid = threadIdx.x;
  const int tm = (tid / 16) * 4, tn = (tid % 16) * 4;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < C; k0 += kTK) {
    for (int e = tid; e < kTM * kTK; e += 256) {
      const int ki = e % kTK, mi = e / kTK;
      const int64_t m = m0 + mi, k = k0 + ki;
      float v = 0.f;
      if (m < M && k < C) {
        v = to_f(a[m * C + k]);
        if (cs) v *= to_f(cs[(m / hw) * C + k]);
      }
      As[ki][mi] = v;
    }
    for (int e = tid; e < kTN * kTK; e += 256) {
      const int ki = e % kTK, ni = e / kTK;
      const int64_t co = n0 + ni, k = k0 + ki;
      Ws[ki][ni] = (co < Co && k < C) ? w[co * C + k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int ki = 0; ki < kTK; ++ki) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[ki][tm + i], bv[i] = Ws[ki][tn + i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tm + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t co = n0 + tn + j;
      if (co >= Co) continue;
      store_epilogue(acc[i][j], co, s, b, act, res, out, m * Co + co);
    }
  }
}

__global__ void __launch_bounds__(kDC* kLanes)
    dw_bwd_input_kernel(const float* __restrict__ gd, const float* __restrict__ taps, Geom g,
                        float* __restrict__ ga) {
  const int64_t n = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.z) * kDC + threadIdx.x;
  if (c >= g.C) return;
  for (int64_t pi = threadIdx.y; pi < kDwPixels; pi += kLanes) {
    const int64_t q = static_cast<int64_t>(blockIdx.y) * kDwPixels + pi;
    if (q >= g.H * g.W) break;
    const int64_t ih = q / g.W, iw = q % g.W;
    float acc = 0.f;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t th = ih + g.pt - kh * g.dh;
      if (th < 0 || th % g.sh) continue;
      const int64_t oh = th / g.sh;
      if (oh >= g.Ho) continue;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t tw = iw + g.pl - kw * g.dw;
        if (tw < 0 || tw % g.sw) continue;
        const int64_t ow = tw / g.sw;
        if (ow >= g.Wo) continue;
        acc += gd[((n * g.Ho + oh) * g.Wo + ow) * g.C + c] * taps[(kh * g.KW + kw) * g.C + c];
      }
    }
    ga[((n * g.H + ih) * g.W + iw) * g.C + c] = acc;
  }
}

__global__ void __launch_bounds__(kDC* kLanes)
    dw_bwd_weight_kernel(const float* __restrict__ a, const float* __restrict__ gd, Geom g,
                         float* __restrict__ part) {
  __shared__ float red[kLanes][kDC];
  const int64_t pb = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kDC + threadIdx.x;
  const int64_t NP = g.N * g.Ho * g.Wo;
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      float sum = 0.f;
      if (c < g.C) {
        for (int64_t pi = threadIdx.y; pi < kDwPixels; pi += kLanes) {
          const int64_t p = pb * kDwPixels + pi;
          if (p >= NP) break;
          const int64_t n = p / (g.Ho * g.Wo), rem = p % (g.Ho * g.Wo);
          const int64_t ih = (rem / g.Wo) * g.sh - g.pt + kh * g.dh;
          const int64_t iw = (rem % g.Wo) * g.sw - g.pl + kw * g.dw;
          if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
          sum += gd[p * g.C + c] * a[((n * g.H + ih) * g.W + iw) * g.C + c];
        }
      }
      red[threadIdx.y][threadIdx.x] = sum;
      __syncthreads();
      if (threadIdx.y == 0 && c < g.C) {
        float t = 0.f;
        for (int l = 0; l < kLanes; ++l) t += red[l][threadIdx.x];
        part[(pb * g.KH * g.KW + kh * g.KW + kw) * g.C + c] = t;
      }
      __syncthreads();
    }
  }
}

unsigned cdiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace

template <class T>
void dwsep_forward(const T* x, const float* taps, const float* pw, const float* dws,
                   const float* dwb, const float* pws, const float* pwb, const T* res,
                   const Geom& g, int64_t Co, int act, int pw_act, bool preact, T* out,
                   cudaStream_t stream) {
  const int64_t NP = g.N * g.Ho * g.Wo;
  if (NP == 0 || Co == 0) return;
  dim3 grid(cdiv(NP, kTP), cdiv(Co, kTO));
  dwsep_kernel<T><<<grid, 256, 0, stream>>>(x, taps, pw, dws, dwb, pws, pwb, res, out, g, Co, act,
                                             pw_act, preact);
  check_launch("dwsep_conv kernel");
}

template <class T>
void dw_forward(const T* x, const float* taps, const float* s, const float* b, const Geom& g,
                int act, T* y, float* part, int64_t pblocks, cudaStream_t stream) {
  if (g.N * g.Ho * g.Wo == 0 || g.C == 0) return;
  dim3 grid(static_cast<unsigned>(g.N), static_cast<unsigned>(pblocks), cdiv(g.C, kDC));
  dw_kernel<T><<<grid, dim3(kDC, kLanes), 0, stream>>>(x, taps, s, b, g, act, y, part);
  check_launch("dw_conv_act kernel");
}

template <class T>
void pw_forward(const T* a, const float* w, const T* cs, const float* s, const float* b, int act,
                const T* res, T* out, int64_t M, int64_t hw, int64_t C, int64_t Co,
                cudaStream_t stream) {
  if (M == 0 || Co == 0) return;
  dim3 grid(cdiv(M, kTM), cdiv(Co, kTN));
  pw_kernel<T><<<grid, 256, 0, stream>>>(a, w, cs, s, b, act, res, out, M, hw, C, Co);
  check_launch("pw_conv kernel");
}

void dw_backward(const float* a, const float* taps, const float* gd, const Geom& g, float* ga,
                 float* part, int64_t pblocks, cudaStream_t stream) {
  if (g.N * g.H * g.W > 0 && g.C > 0) {
    dim3 grid(static_cast<unsigned>(g.N), cdiv(g.H * g.W, kDwPixels), cdiv(g.C, kDC));
    dw_bwd_input_kernel<<<grid, dim3(kDC, kLanes), 0, stream>>>(gd, taps, g, ga);
    check_launch("depthwise backward (input) kernel");
  }
  if (pblocks > 0 && g.C > 0) {
    dim3 grid(static_cast<unsigned>(pblocks), cdiv(g.C, kDC));
    dw_bwd_weight_kernel<<<grid, dim3(kDC, kLanes), 0, stream>>>(a, gd, g, part);
    check_launch("depthwise backward (weight) kernel");
  }
}

#define EFFOPS_DWSEP_CUDA_INSTANTIATE(T)                                                          \
  template void dwsep_forward<T>(const T*, const float*, const float*, const float*, const float*, \
                                 const float*, const float*, const T*, const Geom&, int64_t, int,  \
                                 int, bool, T*, cudaStream_t);                                    \
  template void dw_forward<T>(const T*, const float*, const float*, const float*, const Geom&, int, \
                              T*, float*, int64_t, cudaStream_t);                                 \
  template void pw_forward<T>(const T*, const float*, const T*, const float*, const float*, int,   \
                              const T*, T*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
EFFOPS_DWSEP_CUDA_INSTANTIATE(float)
EFFOPS_DWSEP_CUDA_INSTANTIATE(__half)
EFFOPS_DWSEP_CUDA_INSTANTIATE(__nv_bfloat16)

}  // namespace effops::cuda::dwsep
