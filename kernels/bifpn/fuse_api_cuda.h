// Array-level CUDA entry points of the BiFPN fusion.
#pragma once
#include <cstdint>
#include <vector>

#include "nms/nms_api_cuda.h"

namespace effops::cuda::bifpn {

using nms::CudaArray;

void fuse_forward_api(const std::vector<CudaArray>& inputs, const CudaArray& weights,
                      const std::vector<int>& modes, const std::vector<double>& scales,
                      const std::vector<int64_t>& pads, int act, const CudaArray& out,
                      uintptr_t stream, int device);
void fuse_backward_api(const CudaArray& grad, const std::vector<CudaArray>& inputs,
                       const CudaArray& weights, const std::vector<int>& modes,
                       const std::vector<double>& scales, const std::vector<int64_t>& pads, int act,
                       const CudaArray& gpre, const CudaArray& part,
                       const std::vector<CudaArray>& grads, uintptr_t stream, int device);

}  // namespace effops::cuda::bifpn
