#include "dwsep/dwsep_api_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_check.h"
#include "common/dtype_dispatch.h"
#include "dwsep/dwsep.cuh"

namespace effops::cuda::dwsep {
namespace {

template <class F>
void dispatch(const CudaArray& x, const char* op, F&& f) {
  dispatch_float(x, op, "x", static_cast<F&&>(f));
}

const float* vec(const OptC& v, int64_t n, const char* op, const char* name) {
  if (!v) return nullptr;
  check_shape(*v, {n}, op, name);
  check_dtype(*v, kF32, op, name);
  return data_of<const float>(*v);
}

template <class T>
const T* same(const OptC& v, const CudaArray& like, std::initializer_list<int64_t> shape,
              const char* op, const char* name) {
  if (!v) return nullptr;
  check_shape(*v, shape, op, name);
  check(v->dtype() == like.dtype(), op, ": ", name, " must have the dtype of the input");
  return data_of<const T>(*v);
}

Geom geometry(const CudaArray& x, const CudaArray& taps, const Ints& stride, const Ints& pad,
              const Ints& dil, const char* op) {
  check(x.ndim() == 4 && taps.ndim() == 3, op, ": x must be NHWC and taps [KH, KW, C]");
  check(stride.size() == 2 && pad.size() == 4 && dil.size() == 2, op, ": bad geometry");
  Geom g{};
  g.N = x.shape(0), g.H = x.shape(1), g.W = x.shape(2), g.C = x.shape(3);
  g.KH = taps.shape(0), g.KW = taps.shape(1);
  g.sh = stride[0], g.sw = stride[1], g.pt = pad[0], g.pl = pad[2], g.dh = dil[0], g.dw = dil[1];
  check(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1, op, ": stride and dilation must be >= 1");
  const int64_t eh = g.H + pad[0] + pad[1] - g.dh * (g.KH - 1) - 1;
  const int64_t ew = g.W + pad[2] + pad[3] - g.dw * (g.KW - 1) - 1;
  check(eh >= 0 && ew >= 0, op, ": the input is smaller than the dilated kernel");
  g.Ho = eh / g.sh + 1, g.Wo = ew / g.sw + 1;
  check_shape(taps, {g.KH, g.KW, g.C}, op, "taps");
  check_dtype(taps, kF32, op, "taps");
  return g;
}

cudaStream_t prepare(uintptr_t stream, int device, const char* op) {
  check_cuda(cudaSetDevice(device), op);
  return reinterpret_cast<cudaStream_t>(stream);
}

}  // namespace

void dwsep_forward_api(const CudaArray& x, const CudaArray& taps, const CudaArray& pw, OptC dws,
                       OptC dwb, OptC pws, OptC pwb, OptC res, const Ints& stride, const Ints& pad,
                       const Ints& dilation, int act, int pw_act, bool preact, const CudaArray& out,
                       uintptr_t stream, int device) {
  const char* op = "dwsep_forward";
  const Geom g = geometry(x, taps, stride, pad, dilation, op);
  check(pw.ndim() == 2 && pw.shape(1) == static_cast<size_t>(g.C), op, ": pw must be [Co, C]");
  check_dtype(pw, kF32, op, "pw");
  const int64_t Co = pw.shape(0);
  check_shape(out, {g.N, g.Ho, g.Wo, Co}, op, "out");
  check(out.dtype() == x.dtype(), op, ": out must have the dtype of x");
  cudaStream_t s = prepare(stream, device, op);
  dispatch(x, op, [&](auto t) {
    using T = decltype(t);
    dwsep_forward<T>(data_of<const T>(x), data_of<const float>(taps), data_of<const float>(pw),
                     vec(dws, g.C, op, "dw_scale"), vec(dwb, g.C, op, "dw_bias"),
                     vec(pws, Co, op, "pw_scale"), vec(pwb, Co, op, "pw_bias"),
                     same<T>(res, x, {g.N, g.Ho, g.Wo, Co}, op, "residual"), g, Co, act, pw_act,
                     preact, data_of<T>(out), s);
  });
}

void dw_forward_api(const CudaArray& x, const CudaArray& taps, OptC scale, OptC bias,
                    const Ints& stride, const Ints& pad, const Ints& dilation, int act,
                    const CudaArray& y, const CudaArray& part, uintptr_t stream, int device) {
  const char* op = "dw_forward";
  const Geom g = geometry(x, taps, stride, pad, dilation, op);
  const int64_t pblocks = (g.Ho * g.Wo + kDwPixels - 1) / kDwPixels;
  check_shape(y, {g.N, g.Ho, g.Wo, g.C}, op, "y");
  check(y.dtype() == x.dtype(), op, ": y must have the dtype of x");
  check_shape(part, {g.N, pblocks, g.C}, op, "part");
  check_dtype(part, kF32, op, "part");
  cudaStream_t s = prepare(stream, device, op);
  dispatch(x, op, [&](auto t) {
    using T = decltype(t);
    dw_forward<T>(data_of<const T>(x), data_of<const float>(taps), vec(scale, g.C, op, "scale"),
                  vec(bias, g.C, op, "bias"), g, act, data_of<T>(y), data_of<float>(part), pblocks, s);
  });
}

void pw_forward_api(const CudaArray& a, const CudaArray& w, OptC cs, OptC scale, OptC bias,
                    int act, OptC res, const CudaArray& out, uintptr_t stream, int device) {
  const char* op = "pw_forward";
  check(a.ndim() == 4 && w.ndim() == 2, op, ": a must be NHWC and w [Co, C]");
  const int64_t N = a.shape(0), H = a.shape(1), W = a.shape(2), C = a.shape(3), Co = w.shape(0);
  check_shape(w, {Co, C}, op, "w");
  check_dtype(w, kF32, op, "w");
  check_shape(out, {N, H, W, Co}, op, "out");
  check(out.dtype() == a.dtype(), op, ": out must have the dtype of a");
  cudaStream_t s = prepare(stream, device, op);
  dispatch(a, op, [&](auto t) {
    using T = decltype(t);
    pw_forward<T>(data_of<const T>(a), data_of<const float>(w), same<T>(cs, a, {N, C}, op, "channel_scale"),
                  vec(scale, Co, op, "scale"), vec(bias, Co, op, "bias"), act,
                  same<T>(res, a, {N, H, W, Co}, op, "residual"), data_of<T>(out), N * H * W, H * W, C, Co,
                  s);
  });
}

void dw_backward_api(const CudaArray& a, const CudaArray& taps, const CudaArray& gd,
                     const Ints& stride, const Ints& pad, const Ints& dilation,
                     const CudaArray& ga, const CudaArray& part, uintptr_t stream, int device) {
  const char* op = "dw_backward";
  const Geom g = geometry(a, taps, stride, pad, dilation, op);
  const int64_t pblocks = (g.N * g.Ho * g.Wo + kDwPixels - 1) / kDwPixels;
  check_dtype(a, kF32, op, "a");
  check_shape(gd, {g.N, g.Ho, g.Wo, g.C}, op, "gd");
  check_dtype(gd, kF32, op, "gd");
  check_shape(ga, {g.N, g.H, g.W, g.C}, op, "ga");
  check_dtype(ga, kF32, op, "ga");
  check_shape(part, {pblocks, g.KH * g.KW, g.C}, op, "part");
  check_dtype(part, kF32, op, "part");
  cudaStream_t s = prepare(stream, device, op);
  dw_backward(data_of<const float>(a), data_of<const float>(taps), data_of<const float>(gd), g,
              data_of<float>(ga), data_of<float>(part), pblocks, s);
}

}  // namespace effops::cuda::dwsep
