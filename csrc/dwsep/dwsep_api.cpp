#include "dwsep/dwsep_api.h"

#include "common/memory.h"
#include "dwsep/conv.h"

namespace effops::dwsep {
namespace {

const nb::dlpack::dtype kBF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};

// Calls f(T{}) for the storage type of x: float, double or bf16.
template <class F>
void dispatch_storage(const CpuArray& x, const char* op, F&& f) {
  if (x.dtype() == nb::dtype<float>()) return f(float{});
  if (x.dtype() == nb::dtype<double>()) return f(double{});
  if (x.dtype() == kBF16) return f(simd::bf16{});
  fail(op, ": x must be float32, float64 or bfloat16 on the CPU, got ", dtype_name(x.dtype()));
}

template <class T>
nb::dlpack::dtype dtype_of() {
  if constexpr (std::is_same<T, simd::bf16>::value)
    return kBF16;
  else
    return nb::dtype<T>();
}

template <class T>
const Acc<T>* vec(const Opt& v, int64_t n, const char* op, const char* name) {
  if (!v) return nullptr;
  check_shape(*v, {n}, op, name);
  check_dtype(*v, nb::dtype<Acc<T>>(), op, name);
  return data_of<const Acc<T>>(*v);
}

ConvGeom geometry(const CpuArray& x, int64_t KH, int64_t KW, const std::vector<int64_t>& stride,
                  const std::vector<int64_t>& pad, const std::vector<int64_t>& dil, const char* op) {
  check(x.ndim() == 4, op, ": x must be NHWC [N, H, W, C]");
  check(stride.size() == 2 && pad.size() == 4 && dil.size() == 2, op,
        ": stride, dilation must have 2 values and pad 4 (top, bottom, left, right)");
  for (int i = 0; i < 2; ++i) {
    check(stride[i] >= 1 && stride[i] <= kMaxSize && dil[i] >= 1 && dil[i] <= kMaxSize, op,
          ": stride and dilation must be in [1, ", kMaxSize, "]");
  }
  for (int i = 0; i < 4; ++i) check(pad[i] >= 0 && pad[i] <= kMaxSize, op, ": padding must be in [0, ", kMaxSize, "]");
  check(KH >= 1 && KW >= 1, op, ": the kernel must be at least 1x1, got ", KH, "x", KW);
  ConvGeom g{};
  g.N = x.shape(0), g.H = x.shape(1), g.W = x.shape(2), g.C = x.shape(3);
  g.KH = KH, g.KW = KW, g.sh = stride[0], g.sw = stride[1], g.pt = pad[0], g.pl = pad[2];
  g.dh = dil[0], g.dw = dil[1];
  // Checked: the dilated kernel span dil * (K - 1) is the one product of two unbounded-by-us
  // operands (K is a tensor dimension); everything the kernels compute later is bounded by
  // the padded input extent, which this makes sure fits.
  const int64_t span_h = checked_mul(g.dh, KH - 1, op, "dilation * (kernel height - 1)");
  const int64_t span_w = checked_mul(g.dw, KW - 1, op, "dilation * (kernel width - 1)");
  const int64_t ph = checked_add(checked_add(g.H, pad[0], op, "padded height"), pad[1], op, "padded height");
  const int64_t pw = checked_add(checked_add(g.W, pad[2], op, "padded width"), pad[3], op, "padded width");
  const int64_t eh = ph - span_h - 1;  // ph, span_h >= 0: no overflow
  const int64_t ew = pw - span_w - 1;
  check(eh >= 0 && ew >= 0, op, ": the input is smaller than the dilated kernel");
  g.Ho = eh / g.sh + 1, g.Wo = ew / g.sw + 1;
  return g;
}

}  // namespace

void dw_forward_api(const CpuArray& x, const CpuArray& taps, Opt scale, Opt bias,
                    const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
                    const std::vector<int64_t>& dilation, int act, int in_act, const CpuArray& y,
                    Opt sums, int threads) {
  const char* op = "dw_forward";
  check(taps.ndim() == 3, op, ": taps must be [KH, KW, C]");
  const ConvGeom g = geometry(x, taps.shape(0), taps.shape(1), stride, pad, dilation, op);
  check_shape(taps, {g.KH, g.KW, g.C}, op, "taps");
  check_shape(y, {g.N, g.Ho, g.Wo, g.C}, op, "y");
  check(y.dtype() == x.dtype(), op, ": y must have the dtype of x");
  dispatch_storage(x, op, [&](auto t) {
    using T = decltype(t);
    check_dtype(taps, nb::dtype<Acc<T>>(), op, "taps");
    Acc<T>* s = nullptr;
    if (sums) {
      check_shape(*sums, {g.N, g.C}, op, "sums");
      check_dtype(*sums, nb::dtype<Acc<T>>(), op, "sums");
      s = data_of<Acc<T>>(*sums);
    }
    advise_huge(y.data(), static_cast<int64_t>(y.nbytes()));
    dw_forward<T>(data_of<const T>(x), data_of<const Acc<T>>(taps), vec<T>(scale, g.C, op, "scale"),
                  vec<T>(bias, g.C, op, "bias"), g, act, in_act, data_of<T>(y), s, threads);
  });
}

void dw_backward_api(const CpuArray& a, const CpuArray& taps, const CpuArray& gd,
                     const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
                     const std::vector<int64_t>& dilation, const CpuArray& ga, const CpuArray& gw,
                     int threads) {
  const char* op = "dw_backward";
  check(taps.ndim() == 3, op, ": taps must be [KH, KW, C]");
  const ConvGeom g = geometry(a, taps.shape(0), taps.shape(1), stride, pad, dilation, op);
  check_shape(taps, {g.KH, g.KW, g.C}, op, "taps");
  check_shape(gd, {g.N, g.Ho, g.Wo, g.C}, op, "gd");
  check_shape(ga, {g.N, g.H, g.W, g.C}, op, "ga");
  check_shape(gw, {g.KH, g.KW, g.C}, op, "gw");
  dispatch_float(a, op, "a", [&](auto t) {
    using F = decltype(t);
    for (const CpuArray* arr : {&taps, &gd, &ga, &gw}) check_dtype(*arr, nb::dtype<F>(), op, "all arrays");
    advise_huge(ga.data(), static_cast<int64_t>(ga.nbytes()));
    dw_backward<F>(data_of<const F>(a), data_of<const F>(taps), data_of<const F>(gd), g,
                   data_of<F>(ga), data_of<F>(gw), threads);
  });
}

void pw_forward_api(const CpuArray& y, const CpuArray& w, Opt cs, Opt scale, Opt bias, int act,
                    Opt residual, const CpuArray& out, int threads) {
  const char* op = "pw_forward";
  check(y.ndim() == 4, op, ": y must be NHWC [N, H, W, C]");
  check(w.ndim() == 2, op, ": w must be [Co, C]");
  const int64_t N = y.shape(0), H = y.shape(1), W = y.shape(2), C = y.shape(3), Co = w.shape(0);
  check_shape(w, {Co, C}, op, "w");
  check_shape(out, {N, H, W, Co}, op, "out");
  check(out.dtype() == y.dtype(), op, ": out must have the dtype of y");
  dispatch_storage(y, op, [&](auto t) {
    using T = decltype(t);
    check_dtype(w, nb::dtype<Acc<T>>(), op, "w");
    const Acc<T>* c = nullptr;
    if (cs) {
      check_shape(*cs, {N, C}, op, "channel_scale");
      check_dtype(*cs, nb::dtype<Acc<T>>(), op, "channel_scale");
      c = data_of<const Acc<T>>(*cs);
    }
    const T* r = nullptr;
    if (residual) {
      check_shape(*residual, {N, H, W, Co}, op, "residual");
      check_dtype(*residual, dtype_of<T>(), op, "residual");
      r = data_of<const T>(*residual);
    }
    advise_huge(out.data(), static_cast<int64_t>(out.nbytes()));
    pw_forward<T>(data_of<const T>(y), data_of<const Acc<T>>(w), c, vec<T>(scale, Co, op, "scale"),
                  vec<T>(bias, Co, op, "bias"), act, r, data_of<T>(out), N, H * W, C, Co, threads);
  });
}

void dwsep_forward_api(const CpuArray& x, const CpuArray& taps, const CpuArray& pw, Opt dw_scale,
                       Opt dw_bias, Opt pw_scale, Opt pw_bias, Opt residual,
                       const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
                       const std::vector<int64_t>& dilation, int act, int pw_act, bool preact,
                       const CpuArray& out, int threads) {
  const char* op = "dwsep_forward";
  check(taps.ndim() == 3 && pw.ndim() == 2, op, ": taps must be [KH, KW, C] and pw [Co, C]");
  const ConvGeom g = geometry(x, taps.shape(0), taps.shape(1), stride, pad, dilation, op);
  const int64_t Co = pw.shape(0);
  check_shape(taps, {g.KH, g.KW, g.C}, op, "taps");
  check_shape(pw, {Co, g.C}, op, "pw");
  check_shape(out, {g.N, g.Ho, g.Wo, Co}, op, "out");
  check(out.dtype() == x.dtype(), op, ": out must have the dtype of x");
  dispatch_storage(x, op, [&](auto t) {
    using T = decltype(t);
    check_dtype(taps, nb::dtype<Acc<T>>(), op, "taps");
    check_dtype(pw, nb::dtype<Acc<T>>(), op, "pw");
    const T* r = nullptr;
    if (residual) {
      check_shape(*residual, {g.N, g.Ho, g.Wo, Co}, op, "residual");
      check_dtype(*residual, dtype_of<T>(), op, "residual");
      r = data_of<const T>(*residual);
    }
    advise_huge(out.data(), static_cast<int64_t>(out.nbytes()));
    dwsep_forward<T>(data_of<const T>(x), data_of<const Acc<T>>(taps), data_of<const Acc<T>>(pw),
                     vec<T>(dw_scale, g.C, op, "dw_scale"), vec<T>(dw_bias, g.C, op, "dw_bias"),
                     vec<T>(pw_scale, Co, op, "pw_scale"), vec<T>(pw_bias, Co, op, "pw_bias"), r, g,
                     Co, act, pw_act, preact, data_of<T>(out), threads);
  });
}

}  // namespace effops::dwsep
