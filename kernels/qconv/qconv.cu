// Int8 depthwise and pointwise convolutions with dp4a (4 int8 products summed into int32 per
// instruction). The uint8 codes are shifted to int8 (a - 128) for the signed dp4a and the shift
// is taken out with the weights' sums: sum (a - zp) w = sum (a - 128) w + (128 - zp) sum w.
// Requantisation uses the round-to-nearest intrinsics (no contraction of the float32 product):
// __fmul_rn(__int2float_rn(acc), mult), clamped to +-2^23, __float2int_rn (round half even).
#include "common/cuda_check.h"
#include "qconv/qconv.cuh"

namespace effops::cuda::qconv {
namespace {

constexpr float kClamp = 8388608.0f;

__device__ __forceinline__ int rne_scaled(int v, float m) {
  float p = __fmul_rn(__int2float_rn(v), m);
  p = fminf(fmaxf(p, -kClamp), kClamp);  // NaN -> -2^23, as the CPU kernels
  return __float2int_rn(p);
}

__device__ __forceinline__ uint8_t finish(int acc, float m, int extra, const QEpi& e) {
  int q = rne_scaled(acc, m) + extra + e.zp;
  q = min(max(q, e.qmin), e.qmax);
  return e.lut ? e.lut[q] : static_cast<uint8_t>(q);
}

__global__ void q_dw_kernel(const uint8_t* __restrict__ x, const int8_t* __restrict__ taps, QGeom g, int x_zp,
                            QEpi e, uint8_t* __restrict__ y, int32_t* __restrict__ sums) {
  const int64_t total = g.N * g.Ho * g.Wo * g.C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % g.C;
    int64_t p = i / g.C;
    const int64_t ow = p % g.Wo;
    p /= g.Wo;
    const int64_t oh = p % g.Ho, n = p / g.Ho;
    unsigned acc = e.bias ? static_cast<unsigned>(e.bias[c]) : 0u;  // wraps like int32 two's complement
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = oh * g.sh - g.pt + kh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t iw = ow * g.sw - g.pl + kw;
        if (iw < 0 || iw >= g.W) continue;
        const int xv = static_cast<int>(x[((n * g.H + ih) * g.W + iw) * g.C + c]) - x_zp;
        acc += static_cast<unsigned>(xv * static_cast<int>(taps[(kh * g.KW + kw) * g.C + c]));
      }
    }
    const uint8_t q = finish(static_cast<int>(acc), e.mult[c], 0, e);
    y[i] = q;
    atomicAdd(&sums[n * g.C + c], static_cast<int32_t>(q));  // integer sums: order-independent
  }
}

__device__ __forceinline__ int code(const uint8_t* x, const float* gate, int64_t m, int64_t HW, int64_t K, int64_t k,
                                    int x_zp) {
  int a = x[m * K + k];
  if (gate) {
    a = rne_scaled(a - x_zp, gate[(m / HW) * K + k]) + x_zp;
    a = min(max(a, 0), 255);
  }
  return a;
}

// One thread per output (m, co); 4 input channels per dp4a.
__global__ void q_pw_kernel(const uint8_t* __restrict__ x, const int8_t* __restrict__ w, int64_t M, int64_t HW,
                            int64_t K, int64_t Co, int x_zp, const float* __restrict__ gate, QEpi e,
                            const uint8_t* __restrict__ res, int res_zp, float res_mult, uint8_t* __restrict__ out) {
  const int64_t total = M * Co;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t co = i % Co, m = i / Co;
    int acc = 0, wsum = 0;
    for (int64_t k0 = 0; k0 < K; k0 += 4) {
      unsigned a4 = 0, w4 = 0;
      for (int j = 0; j < 4; ++j) {
        const int64_t k = k0 + j;
        const int a = k < K ? code(x, gate, m, HW, K, k, x_zp) - 128 : 0;
        const int wv = k < K ? w[co * K + k] : 0;
        wsum += wv;
        a4 |= (static_cast<unsigned>(a) & 0xffu) << (8 * j);
        w4 |= (static_cast<unsigned>(wv) & 0xffu) << (8 * j);
      }
      acc = __dp4a(static_cast<int>(a4), static_cast<int>(w4), acc);  // |acc| < 2^30: no overflow
    }
    unsigned total_acc = static_cast<unsigned>(acc) + static_cast<unsigned>((128 - x_zp) * wsum) +
                         (e.bias ? static_cast<unsigned>(e.bias[co]) : 0u);
    const int extra = res ? rne_scaled(static_cast<int>(res[i]) - res_zp, res_mult) : 0;
    out[i] = finish(static_cast<int>(total_acc), e.mult[co], extra, e);
  }
}

int blocks_for(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return static_cast<int>(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

}  // namespace

void q_dw_forward(const uint8_t* x, const int8_t* taps, const QGeom& g, int x_zp, const QEpi& e, uint8_t* y,
                  int32_t* sums, cudaStream_t stream) {
  check_cuda(cudaMemsetAsync(sums, 0, sizeof(int32_t) * g.N * g.C, stream), "q_dw_forward");
  const int64_t total = g.N * g.Ho * g.Wo * g.C;
  if (total == 0) return;
  q_dw_kernel<<<blocks_for(total, 256), 256, 0, stream>>>(x, taps, g, x_zp, e, y, sums);
  check_launch("q_dw_forward");
}

void q_pw_forward(const uint8_t* x, const int8_t* w, int64_t M, int64_t HW, int64_t K, int64_t Co, int x_zp,
                  const float* gate, const QEpi& e, const uint8_t* res, int res_zp, float res_mult, uint8_t* out,
                  cudaStream_t stream) {
  const int64_t total = M * Co;
  if (total == 0) return;
  q_pw_kernel<<<blocks_for(total, 256), 256, 0, stream>>>(x, w, M, HW, K, Co, x_zp, gate, e, res, res_zp, res_mult,
                                                          out);
  check_launch("q_pw_forward");
}

}  // namespace effops::cuda::qconv
