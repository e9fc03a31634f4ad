#include "qconv/qconv_api_cuda.h"

#include "common/cuda_check.h"
#include "qconv/qconv.cuh"
#include "qconv/qconv_checks.h"

namespace effops::cuda::qconv {
namespace {

using qconv_checks::check_code;

cudaStream_t prepare(uintptr_t stream, int device, const char* op) {
  check_cuda(cudaSetDevice(device), op);
  return reinterpret_cast<cudaStream_t>(stream);
}

}  // namespace

void q_dw_forward_api(const CudaArray& x, const CudaArray& taps, OptC bias, const CudaArray& mult, OptC lut,
                      const Ints& stride, const Ints& pad, int64_t x_zp, int64_t out_zp, int64_t qmin, int64_t qmax,
                      const CudaArray& y, const CudaArray& sums, uintptr_t stream, int device) {
  const char* op = "q_dw_forward";
  check(x.ndim() == 4, op, ": x must be NHWC [N, H, W, C]");
  check_dtype(x, nb::dtype<uint8_t>(), op, "x");
  check(taps.ndim() == 3, op, ": taps must be [KH, KW, C]");
  check_dtype(taps, nb::dtype<int8_t>(), op, "taps");
  QGeom g{};
  g.N = x.shape(0), g.H = x.shape(1), g.W = x.shape(2), g.C = x.shape(3), g.KH = taps.shape(0), g.KW = taps.shape(1);
  check_shape(taps, {g.KH, g.KW, g.C}, op, "taps");
  qconv_checks::conv_output(g, stride, pad, op);
  check_code(x_zp, op, "x_zp");
  const QEpi e = qconv_checks::epilogue_of<QEpi>(bias, mult, lut, g.C, out_zp, qmin, qmax, op);
  qconv_checks::dw_outputs(y, sums, g, op);
  const cudaStream_t s = prepare(stream, device, op);
  q_dw_forward(data_of<const uint8_t>(x), data_of<const int8_t>(taps), g, static_cast<int>(x_zp), e,
               data_of<uint8_t>(y), data_of<int32_t>(sums), s);
}

void q_pw_forward_api(const CudaArray& x, const CudaArray& w, OptC bias, const CudaArray& mult, OptC lut, OptC gate,
                      OptC residual, int64_t x_zp, int64_t out_zp, int64_t qmin, int64_t qmax, int64_t res_zp,
                      double res_mult, const CudaArray& out, uintptr_t stream, int device) {
  const char* op = "q_pw_forward";
  const auto [N, H, W, C, Co, g] = qconv_checks::pw_inputs(x, w, gate, op);
  check_code(x_zp, op, "x_zp");
  const QEpi e = qconv_checks::epilogue_of<QEpi>(bias, mult, lut, Co, out_zp, qmin, qmax, op);
  const uint8_t* r = qconv_checks::residual_of(residual, {N, H, W, Co}, res_zp, res_mult, e.lut != nullptr, op);
  qconv_checks::u8_output(out, {N, H, W, Co}, op);
  const cudaStream_t s = prepare(stream, device, op);
  q_pw_forward(data_of<const uint8_t>(x), data_of<const int8_t>(w), N * H * W, H * W, C, Co, static_cast<int>(x_zp), g,
               e, r, static_cast<int>(res_zp), static_cast<float>(res_mult), data_of<uint8_t>(out), s);
}

}  // namespace effops::cuda::qconv
