#include "qconv/qconv_api_cuda.h"

#include <cmath>

#include "common/cuda_check.h"
#include "qconv/qconv.cuh"

namespace effops::cuda::qconv {
namespace {

constexpr int64_t kMaxReduction = (int64_t{1} << 30) / (255 * 128);

void code(int64_t v, const char* op, const char* name) {
  check(v >= 0 && v <= 255, op, ": ", name, " must be in [0, 255], got ", v);
}

QEpi epilogue(const OptC& bias, const CudaArray& mult, const OptC& lut, int64_t C, int64_t zp, int64_t qmin,
              int64_t qmax, const char* op) {
  code(zp, op, "zero point");
  code(qmin, op, "qmin");
  code(qmax, op, "qmax");
  check(qmin <= qmax, op, ": qmin must be <= qmax");
  check_shape(mult, {C}, op, "mult");
  check_dtype(mult, nb::dtype<float>(), op, "mult");
  QEpi e{nullptr, data_of<const float>(mult), nullptr, static_cast<int>(zp), static_cast<int>(qmin),
         static_cast<int>(qmax)};
  if (bias) {
    check_shape(*bias, {C}, op, "bias");
    check_dtype(*bias, nb::dtype<int32_t>(), op, "bias");
    e.bias = data_of<const int32_t>(*bias);
  }
  if (lut) {
    check_shape(*lut, {256}, op, "lut");
    check_dtype(*lut, nb::dtype<uint8_t>(), op, "lut");
    e.lut = data_of<const uint8_t>(*lut);
  }
  return e;
}

cudaStream_t prepare(uintptr_t stream, int device, const char* op) {
  check_cuda(cudaSetDevice(device), op);
  return reinterpret_cast<cudaStream_t>(stream);
}

}  // namespace

void q_dw_forward_api(const CudaArray& x, const CudaArray& taps, OptC bias, const CudaArray& mult, OptC lut,
                      const Ints& stride, const Ints& pad, int64_t x_zp, int64_t out_zp, int64_t qmin, int64_t qmax,
                      const CudaArray& y, const CudaArray& sums, uintptr_t stream, int device) {
  const char* op = "q_dw_forward";
  check(x.ndim() == 4 && taps.ndim() == 3, op, ": x must be NHWC and taps [KH, KW, C]");
  check_dtype(x, nb::dtype<uint8_t>(), op, "x");
  check_dtype(taps, nb::dtype<int8_t>(), op, "taps");
  check(stride.size() == 2 && pad.size() == 4, op, ": stride must have 2 values and pad 4");
  QGeom g{};
  g.N = x.shape(0), g.H = x.shape(1), g.W = x.shape(2), g.C = x.shape(3), g.KH = taps.shape(0), g.KW = taps.shape(1);
  check_shape(taps, {g.KH, g.KW, g.C}, op, "taps");
  check(g.KH * g.KW >= 1 && g.KH * g.KW <= kMaxReduction, op, ": bad kernel size");
  for (int64_t s : stride) check(s >= 1 && s <= kMaxSize, op, ": stride must be >= 1");
  for (int64_t p : pad) check(p >= 0 && p <= kMaxSize, op, ": padding must be >= 0");
  g.sh = stride[0], g.sw = stride[1], g.pt = pad[0], g.pl = pad[2];
  const int64_t eh = g.H + pad[0] + pad[1] - g.KH, ew = g.W + pad[2] + pad[3] - g.KW;
  check(eh >= 0 && ew >= 0, op, ": the input is smaller than the kernel");
  g.Ho = eh / g.sh + 1, g.Wo = ew / g.sw + 1;
  code(x_zp, op, "x_zp");
  const QEpi e = epilogue(bias, mult, lut, g.C, out_zp, qmin, qmax, op);
  check_shape(y, {g.N, g.Ho, g.Wo, g.C}, op, "y");
  check_dtype(y, nb::dtype<uint8_t>(), op, "y");
  check_shape(sums, {g.N, g.C}, op, "sums");
  check_dtype(sums, nb::dtype<int32_t>(), op, "sums");
  const cudaStream_t s = prepare(stream, device, op);
  q_dw_forward(data_of<const uint8_t>(x), data_of<const int8_t>(taps), g, static_cast<int>(x_zp), e,
               data_of<uint8_t>(y), data_of<int32_t>(sums), s);
}

void q_pw_forward_api(const CudaArray& x, const CudaArray& w, OptC bias, const CudaArray& mult, OptC lut, OptC gate,
                      OptC residual, int64_t x_zp, int64_t out_zp, int64_t qmin, int64_t qmax, int64_t res_zp,
                      double res_mult, const CudaArray& out, uintptr_t stream, int device) {
  const char* op = "q_pw_forward";
  check(x.ndim() == 4 && w.ndim() == 2, op, ": x must be NHWC and w [Co, C]");
  check_dtype(x, nb::dtype<uint8_t>(), op, "x");
  check_dtype(w, nb::dtype<int8_t>(), op, "w");
  const int64_t N = x.shape(0), H = x.shape(1), W = x.shape(2), C = x.shape(3), Co = w.shape(0);
  check_shape(w, {Co, C}, op, "w");
  check(C >= 1 && C <= kMaxReduction && Co >= 1, op, ": bad channel counts");
  code(x_zp, op, "x_zp");
  const QEpi e = epilogue(bias, mult, lut, Co, out_zp, qmin, qmax, op);
  const float* g = nullptr;
  if (gate) {
    check_shape(*gate, {N, C}, op, "gate");
    check_dtype(*gate, nb::dtype<float>(), op, "gate");
    g = data_of<const float>(*gate);
  }
  const uint8_t* r = nullptr;
  if (residual) {
    check_shape(*residual, {N, H, W, Co}, op, "residual");
    check_dtype(*residual, nb::dtype<uint8_t>(), op, "residual");
    check(!e.lut, op, ": a residual cannot be combined with a lut");
    code(res_zp, op, "res_zp");
    check(std::isfinite(res_mult), op, ": res_mult must be finite");
    r = data_of<const uint8_t>(*residual);
  }
  check_shape(out, {N, H, W, Co}, op, "out");
  check_dtype(out, nb::dtype<uint8_t>(), op, "out");
  const cudaStream_t s = prepare(stream, device, op);
  q_pw_forward(data_of<const uint8_t>(x), data_of<const int8_t>(w), N * H * W, H * W, C, Co, static_cast<int>(x_zp), g,
               e, r, static_cast<int>(res_zp), static_cast<float>(res_mult), data_of<uint8_t>(out), s);
}

}  // namespace effops::cuda::qconv
