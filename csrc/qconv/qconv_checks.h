// The argument checks of the int8 convolution entry points, shared by the CPU adapter
// (qconv_api.cpp) and the CUDA one (kernels/qconv/qconv_api_cuda.cpp): templates over the array
// type (CpuArray or CudaArray) and the backend's structs (Epilogue / QEpi, DwGeom / QGeom, which
// have the same fields). What differs per backend stays with it: the depthwise taps layout
// (CPU [C, KH, KW], CUDA [KH, KW, C]) and the CPU's packed weight blobs.
#pragma once
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "common/errors.h"
#include "common/ndarray.h"

namespace effops::qconv_checks {

// |sum of products| <= taps * 255 * 128 < 2^30 (the Python layer bounds it the same way).
inline constexpr int64_t kMaxReduction = (int64_t{1} << 30) / (255 * 128);

inline void check_code(int64_t v, const char* op, const char* name) {
  check(v >= 0 && v <= 255, op, ": ", name, " must be in [0, 255], got ", v);
}

// The requantising epilogue of C channels: zero point and clamp codes in [0, 255], qmin <= qmax,
// mult [C] float32, bias [C] int32 (optional), lut [256] uint8 (optional). prefix names the
// epilogue in the qmin/qmax message ("mid_" for the fused kernel's depthwise stage).
template <class E, class A>
E epilogue_of(const std::optional<A>& bias, const A& mult, const std::optional<A>& lut, int64_t C, int64_t zp,
              int64_t qmin, int64_t qmax, const char* op, const char* prefix = "") {
  check_code(zp, op, "zero point");
  check_code(qmin, op, "qmin");
  check_code(qmax, op, "qmax");
  check(qmin <= qmax, op, ": ", prefix, "qmin must be <= qmax");
  check_shape(mult, {C}, op, "mult");
  check_dtype(mult, nb::dtype<float>(), op, "mult");
  E e{};
  e.mult = data_of<const float>(mult);
  e.zp = static_cast<decltype(e.zp)>(zp);
  e.qmin = static_cast<decltype(e.qmin)>(qmin);
  e.qmax = static_cast<decltype(e.qmax)>(qmax);
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

// The uint8 residual of the given shape (optional): its zero point in [0, 255], a finite
// multiplier, and no lut epilogue beside it. Returns its codes, or null without one.
template <class A>
const uint8_t* residual_of(const std::optional<A>& r, std::initializer_list<int64_t> shape, int64_t zp, double mult,
                           bool has_lut, const char* op) {
  if (!r) return nullptr;
  check_shape(*r, shape, op, "residual");
  check_dtype(*r, nb::dtype<uint8_t>(), op, "residual");
  check_code(zp, op, "res_zp");
  check(std::isfinite(mult), op, ": res_mult must be finite");
  check(!has_lut, op, ": a residual cannot be combined with a lut");
  return data_of<const uint8_t>(*r);
}

// The depthwise geometry once N, H, W, C, KH, KW are set: 1..kMaxReduction taps, stride (2
// values) in [1, kMaxSize], padding (top, bottom, left, right) in [0, kMaxSize], an input at
// least as large as the kernel; fills sh, sw, pt, pl, Ho, Wo.
template <class G>
void conv_output(G& g, const std::vector<int64_t>& stride, const std::vector<int64_t>& pad, const char* op) {
  check(g.KH >= 1 && g.KW >= 1 && g.KH * g.KW <= kMaxReduction, op, ": the kernel must have 1..", kMaxReduction,
        " taps");
  check(stride.size() == 2 && pad.size() == 4, op, ": stride must have 2 values and pad 4");
  for (int64_t s : stride) check(s >= 1 && s <= kMaxSize, op, ": stride must be in [1, ", kMaxSize, "]");
  for (int64_t p : pad) check(p >= 0 && p <= kMaxSize, op, ": padding must be in [0, ", kMaxSize, "]");
  g.sh = stride[0], g.sw = stride[1], g.pt = pad[0], g.pl = pad[2];
  const int64_t eh = g.H + pad[0] + pad[1] - g.KH, ew = g.W + pad[2] + pad[3] - g.KW;
  check(eh >= 0 && ew >= 0, op, ": the input is smaller than the kernel");
  g.Ho = eh / g.sh + 1, g.Wo = ew / g.sw + 1;
}

// The depthwise outputs: y [N, Ho, Wo, C] uint8, sums [N, C] int32.
template <class A, class G>
void dw_outputs(const A& y, const A& sums, const G& g, const char* op) {
  check_shape(y, {g.N, g.Ho, g.Wo, g.C}, op, "y");
  check_dtype(y, nb::dtype<uint8_t>(), op, "y");
  check_shape(sums, {g.N, g.C}, op, "sums");
  check_dtype(sums, nb::dtype<int32_t>(), op, "sums");
}

// The pointwise inputs: x [N, H, W, C] uint8 (NHWC), w [Co, C] int8 with 1..kMaxReduction input
// and >= 1 output channels, gate [N, C] float32 (optional).
struct PwSizes {
  int64_t N, H, W, C, Co;
  const float* gate;
};

template <class A>
PwSizes pw_inputs(const A& x, const A& w, const std::optional<A>& gate, const char* op) {
  check(x.ndim() == 4, op, ": x must be NHWC [N, H, W, C]");
  check_dtype(x, nb::dtype<uint8_t>(), op, "x");
  check(w.ndim() == 2, op, ": w must be [Co, C]");
  check_dtype(w, nb::dtype<int8_t>(), op, "w");
  PwSizes s{};
  s.N = x.shape(0), s.H = x.shape(1), s.W = x.shape(2), s.C = x.shape(3), s.Co = w.shape(0);
  check_shape(w, {s.Co, s.C}, op, "w");
  check(s.C >= 1 && s.C <= kMaxReduction && s.Co >= 1, op, ": need 1..", kMaxReduction,
        " input and >= 1 output channels");
  if (gate) {
    check_shape(*gate, {s.N, s.C}, op, "gate");
    check_dtype(*gate, nb::dtype<float>(), op, "gate");
    s.gate = data_of<const float>(*gate);
  }
  return s;
}

// A uint8 output [N, H, W, Co].
template <class A>
void u8_output(const A& out, std::initializer_list<int64_t> shape, const char* op) {
  check_shape(out, shape, op, "out");
  check_dtype(out, nb::dtype<uint8_t>(), op, "out");
}

}  // namespace effops::qconv_checks
