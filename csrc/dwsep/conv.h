// CPU kernels of the depthwise-separable family (NHWC; semantics in python/effops/ops/dwsep.py).
//
// Storage types T: float, double, simd::bf16. Per-channel vectors, weights and accumulators are
// F = float (double for double storage). Outputs are preallocated by the caller.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "dwsep/simd.h"

namespace effops::dwsep {

struct ConvGeom {
  int64_t N, H, W, C;    // input, NHWC
  int64_t Ho, Wo;        // output
  int64_t KH, KW;        // kernel
  int64_t sh, sw;        // stride
  int64_t pt, pl;        // top / left padding (bottom / right follow from Ho, Wo)
  int64_t dh, dw;        // dilation
};

template <class T>
using Acc = typename simd::Traits<T>::F;

// Threads worth using for `macs` multiply-adds: waking a worker costs about as much as ~1M MACs,
// so small problems stay on the calling thread.
inline int threads_for(double macs, int threads) {
  constexpr double kPerThread = 1 << 20;
  return static_cast<int>(std::max(1.0, std::min<double>(threads, macs / kPerThread)));
}

// y[n, oh, ow, c] = act(sum_taps a[n, ih, iw, c] * taps[kh, kw, c] * scale[c] + bias[c]) with
// a = in_act(x) (in_act = none: a = x); sums[n, c] = sum over (oh, ow) of y (may be null).
// scale, bias may be null. taps: [KH, KW, C].
template <class T>
void dw_forward(const T* x, const Acc<T>* taps, const Acc<T>* scale, const Acc<T>* bias,
                const ConvGeom& g, int act, int in_act, T* y, Acc<T>* sums, int threads);

// Backward of the raw depthwise conv: ga = dL/da [N, H, W, C], gw = dL/dtaps [KH, KW, C],
// given a [N, H, W, C] and gd = dL/d(raw output) [N, Ho, Wo, C].
template <class F>
void dw_backward(const F* a, const F* taps, const F* gd, const ConvGeom& g, F* ga, F* gw,
                 int threads);

// out[m, co] = act((sum_c y[m, c] * cs[n(m), c] * w[co, c]) * scale[co] + bias[co]) + res[m, co]
// for m over N*HW pixels (n(m) = m / HW). cs, scale, bias, res may be null. w: [Co, C].
template <class T>
void pw_forward(const T* y, const Acc<T>* w, const Acc<T>* cs, const Acc<T>* scale,
                const Acc<T>* bias, int act, const T* res, T* out, int64_t N, int64_t HW,
                int64_t C, int64_t Co, int threads);

// The bf16 GEMM of pw_forward on weights packed once, on the AMX tiles (amx = true; gemm_amx.h)
// or with vdpbf16ps (amx = false; gemm_bf16.h; CPUs with AVX512_BF16: bf16dot_cpu).
// pack_pw_bf16 gives the panels of w [Co][C] for one of them (empty while the AMX kernels are off
// / on a CPU without AVX512_BF16); pw_forward_bf16 runs the GEMM on them - false, nothing
// written, where it cannot run now (AMX off, another ISA level) or where pw_forward would take
// its transposed small-M GEMM instead (the vdpbf16ps panels): the caller runs pw_forward. The SE
// scale cs scales the rows of y as they are packed (pw_forward folds one image's cs into the
// weights it packs instead).
bool bf16dot_cpu();
std::vector<uint16_t> pack_pw_bf16(bool amx, const float* w, int64_t Co, int64_t C);
bool pw_forward_bf16(bool amx, const simd::bf16* y, const uint16_t* panels, const float* cs, const float* scale,
                     const float* bias, int act, const simd::bf16* res, simd::bf16* out, int64_t N, int64_t HW,
                     int64_t C, int64_t Co, int threads);

// The fused depthwise-separable conv: depthwise stage (as dw_forward, with act applied to the
// input when preact, else after the dw affine) straight into the pointwise stage (as pw_forward),
// tile by tile, without writing the intermediate.
template <class T>
void dwsep_forward(const T* x, const Acc<T>* taps, const Acc<T>* pw, const Acc<T>* dw_scale,
                   const Acc<T>* dw_bias, const Acc<T>* pw_scale, const Acc<T>* pw_bias,
                   const T* res, const ConvGeom& g, int64_t Co, int act, int pw_act, bool preact,
                   T* out, int threads);

}  // namespace effops::dwsep
