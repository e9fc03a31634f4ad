// Array-level entry points of the BiFPN fusion (checked shapes/dtypes, dispatch).
#pragma once
#include <vector>

#include "common/ndarray.h"

namespace effops::bifpn {

void fuse_forward_api(const std::vector<CpuArray>& inputs, const std::vector<double>& weights,
                      const std::vector<int>& modes, int act, const CpuArray& out, int threads);
void fuse_backward_api(const CpuArray& grad, const std::vector<CpuArray>& inputs,
                       const std::vector<double>& weights, const std::vector<int>& modes, int act,
                       const std::vector<CpuArray>& grads, const CpuArray& grad_weights, int threads);

}  // namespace effops::bifpn
