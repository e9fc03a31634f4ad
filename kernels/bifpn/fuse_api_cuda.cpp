#include "bifpn/fuse_api_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bifpn/fuse.cuh"
#include "common/cuda_check.h"
#include "common/dtype_dispatch.h"

namespace effops::cuda::bifpn {
namespace {

template <class F>
void dispatch(const CudaArray& x, const char* op, F&& f) {
  dispatch_float(x, op, "inputs", static_cast<F&&>(f));
}

// scales: 2 per input (nearest ratios), pads: 2 per input (pool top/left); modes 0/1/2.
FuseArgs describe(const std::vector<CudaArray>& inputs, const CudaArray& weights, const std::vector<int>& modes,
                  const std::vector<double>& scales, const std::vector<int64_t>& pads, int act, int64_t N,
                  int64_t C, int64_t Ho, int64_t Wo, const char* op) {
  const size_t k = inputs.size();
  check(k >= 2 && k <= 4 && modes.size() == k && scales.size() == 2 * k && pads.size() == 2 * k, op,
        ": 2 to 4 inputs, each with a mode, two scales and two pads");
  check_shape(weights, {static_cast<int64_t>(k)}, op, "weights");
  check_dtype(weights, kF32, op, "weights");
  FuseArgs a{};
  a.k = static_cast<int>(k), a.w = data_of<const float>(weights), a.N = N, a.C = C, a.Ho = Ho, a.Wo = Wo, a.act = act;
  for (size_t i = 0; i < k; ++i) {
    const CudaArray& x = inputs[i];
    check(x.ndim() == 4 && static_cast<int64_t>(x.shape(0)) == N && static_cast<int64_t>(x.shape(3)) == C &&
              x.dtype() == inputs[0].dtype(),
          op, ": inputs must be NHWC with one dtype and the output's N and C");
    check(modes[i] >= 0 && modes[i] <= 2, op, ": unknown mode");
    const int64_t H = x.shape(1), W = x.shape(2);
    const bool ok = modes[i] == 0 ? (H == Ho && W == Wo) : modes[i] == 1 ? (H <= Ho && W <= Wo)
                                                                         : ((H + 1) / 2 == Ho && (W + 1) / 2 == Wo);
    check(ok, op, ": input ", i, " does not map to the output size with its resample mode");
    a.in[i] = FuseIn{x.data(), H, W, modes[i], static_cast<float>(scales[2 * i]), static_cast<float>(scales[2 * i + 1]),
                     pads[2 * i], pads[2 * i + 1]};
  }
  return a;
}

cudaStream_t prepare(uintptr_t stream, int device, const char* op) {
  check_cuda(cudaSetDevice(device), op);
  return reinterpret_cast<cudaStream_t>(stream);
}

}  // namespace

void fuse_forward_api(const std::vector<CudaArray>& inputs, const CudaArray& weights,
                      const std::vector<int>& modes, const std::vector<double>& scales,
                      const std::vector<int64_t>& pads, int act, const CudaArray& out,
                      uintptr_t stream, int device) {
  const char* op = "fuse_forward";
  check(out.ndim() == 4 && !inputs.empty() && out.dtype() == inputs[0].dtype(), op,
        ": out must be NHWC with the inputs' dtype");
  const FuseArgs a = describe(inputs, weights, modes, scales, pads, act, out.shape(0), out.shape(3), out.shape(1),
                              out.shape(2), op);
  cudaStream_t s = prepare(stream, device, op);
  dispatch(inputs[0], op, [&](auto t) {
    using T = decltype(t);
    fuse_forward<T>(a, data_of<T>(out), s);
  });
}

void fuse_backward_api(const CudaArray& grad, const std::vector<CudaArray>& inputs,
                       const CudaArray& weights, const std::vector<int>& modes,
                       const std::vector<double>& scales, const std::vector<int64_t>& pads, int act,
                       const CudaArray& gpre, const CudaArray& part,
                       const std::vector<CudaArray>& grads, uintptr_t stream, int device) {
  const char* op = "fuse_backward";
  check(grad.ndim() == 4, op, ": grad must be NHWC");
  check_dtype(grad, kF32, op, "grad");
  const int64_t N = grad.shape(0), Ho = grad.shape(1), Wo = grad.shape(2), C = grad.shape(3);
  const FuseArgs a = describe(inputs, weights, modes, scales, pads, act, N, C, Ho, Wo, op);
  check_shape(gpre, {N, Ho, Wo, C}, op, "gpre");
  check_dtype(gpre, kF32, op, "gpre");
  const int64_t blocks = (N * Ho * Wo * C + kFuseThreads - 1) / kFuseThreads;
  check_shape(part, {blocks, 4}, op, "part");
  check_dtype(part, kF32, op, "part");
  check(grads.size() == inputs.size(), op, ": one gradient buffer per input");
  cudaStream_t s = prepare(stream, device, op);
  dispatch(inputs[0], op, [&](auto t) {
    using T = decltype(t);
    fuse_backward_pre<T>(a, data_of<const float>(grad), data_of<float>(gpre), data_of<float>(part), blocks, s);
    for (int i = 0; i < a.k; ++i) {
      if (modes[i] == 0) continue;  // identity: the caller scales gpre
      check_shape(grads[i], {N, a.in[i].H, a.in[i].W, C}, op, "grads");
      check_dtype(grads[i], kF32, op, "grads");
      fuse_backward_gather<T>(a, i, data_of<const float>(gpre), data_of<float>(grads[i]), s);
    }
  });
}

}  // namespace effops::cuda::bifpn
