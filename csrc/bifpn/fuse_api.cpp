#include "bifpn/fuse_api.h"

#include "bifpn/fuse.h"

namespace effops::bifpn {
namespace {

const nb::dlpack::dtype kBF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};

template <class F>
void dispatch(const CpuArray& x, const char* op, F&& f) {
  if (x.dtype() == nb::dtype<float>()) return f(float{});
  if (x.dtype() == nb::dtype<double>()) return f(double{});
  if (x.dtype() == kBF16) return f(simd::bf16{});
  fail(op, ": inputs must be float32, float64 or bfloat16 on the CPU, got ", dtype_name(x.dtype()));
}

// Inputs as kernel descriptors, after checking they agree with each other and with out (N, C).
template <class T>
std::vector<Input<T>> describe(const std::vector<CpuArray>& inputs, const std::vector<double>& weights,
                               const std::vector<int>& modes, int64_t N, int64_t C, const char* op) {
  check(inputs.size() >= 2 && inputs.size() <= 4, op, ": 2 to 4 inputs");
  check(modes.size() == inputs.size(), op, ": one resample mode per input");
  check(weights.size() == inputs.size(), op, ": one weight per input");
  std::vector<Input<T>> in;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const CpuArray& x = inputs[i];
    check(x.ndim() == 4 && static_cast<int64_t>(x.shape(0)) == N && static_cast<int64_t>(x.shape(3)) == C, op,
          ": every input must be NHWC with the output's N and C");
    check(x.dtype() == inputs[0].dtype(), op, ": inputs must share one dtype");
    check(modes[i] >= kIdentity && modes[i] <= kMaxPoolSym, op, ": unknown resample mode");
    in.push_back({data_of<const T>(x), static_cast<int64_t>(x.shape(1)), static_cast<int64_t>(x.shape(2)), modes[i],
                  weights[i]});
  }
  return in;
}

void check_sizes(const std::vector<CpuArray>& inputs, const std::vector<int>& modes, int64_t Ho, int64_t Wo,
                 const char* op) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t H = inputs[i].shape(1), W = inputs[i].shape(2);
    bool ok = modes[i] == kIdentity ? (H == Ho && W == Wo)
              : modes[i] == kNearest ? (H <= Ho && W <= Wo && H > 0 && W > 0)
                                     : ((H + 1) / 2 == Ho && (W + 1) / 2 == Wo);
    check(ok, op, ": input ", i, " (", H, "x", W, ") does not map to the output size ", Ho, "x", Wo,
          " with its resample mode");
  }
}

}  // namespace

void fuse_forward_api(const std::vector<CpuArray>& inputs, const std::vector<double>& weights,
                      const std::vector<int>& modes, int act, const CpuArray& out, int threads) {
  const char* op = "fuse_forward";
  check(out.ndim() == 4, op, ": out must be NHWC");
  const int64_t N = out.shape(0), Ho = out.shape(1), Wo = out.shape(2), C = out.shape(3);
  check(!inputs.empty() && out.dtype() == inputs[0].dtype(), op, ": out must have the inputs' dtype");
  check_sizes(inputs, modes, Ho, Wo, op);
  dispatch(inputs[0], op, [&](auto t) {
    using T = decltype(t);
    fuse_forward<T>(describe<T>(inputs, weights, modes, N, C, op), N, C, Ho, Wo, act, data_of<T>(out), threads);
  });
}

void fuse_backward_api(const CpuArray& grad, const std::vector<CpuArray>& inputs,
                       const std::vector<double>& weights, const std::vector<int>& modes, int act,
                       const std::vector<CpuArray>& grads, const CpuArray& grad_weights, int threads) {
  const char* op = "fuse_backward";
  check(grad.ndim() == 4, op, ": grad must be NHWC");
  const int64_t N = grad.shape(0), Ho = grad.shape(1), Wo = grad.shape(2), C = grad.shape(3);
  check_sizes(inputs, modes, Ho, Wo, op);
  check(grads.size() == inputs.size(), op, ": one gradient buffer per input");
  check_shape(grad_weights, {static_cast<int64_t>(inputs.size())}, op, "grad_weights");
  check_dtype(grad_weights, nb::dtype<double>(), op, "grad_weights");
  dispatch(inputs[0], op, [&](auto t) {
    using T = decltype(t);
    using F = typename simd::Traits<T>::F;
    check_dtype(grad, nb::dtype<F>(), op, "grad");
    std::vector<F*> g;
    for (size_t i = 0; i < grads.size(); ++i) {
      check_shape(grads[i], {N, static_cast<int64_t>(inputs[i].shape(1)), static_cast<int64_t>(inputs[i].shape(2)), C},
                  op, "grads");
      check_dtype(grads[i], nb::dtype<F>(), op, "grads");
      g.push_back(data_of<F>(grads[i]));
    }
    fuse_backward<T, F>(data_of<const F>(grad), describe<T>(inputs, weights, modes, N, C, op), N, C, Ho, Wo, act, g,
                        data_of<double>(grad_weights), threads);
  });
}

}  // namespace effops::bifpn
