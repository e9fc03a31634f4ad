// Array-level entry points of the depthwise-separable family (checked shapes/dtypes, dispatch).
// All activations are NHWC contiguous; see python/effops/ops/dwsep.py for the semantics.
#pragma once
#include <optional>
#include <vector>

#include "common/ndarray.h"

namespace effops::dwsep {

using Opt = std::optional<CpuArray>;

void dw_forward_api(const CpuArray& x, const CpuArray& taps, Opt scale, Opt bias,
                    const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
                    const std::vector<int64_t>& dilation, int act, int in_act, const CpuArray& y,
                    Opt sums, int threads);
void dw_backward_api(const CpuArray& a, const CpuArray& taps, const CpuArray& gd,
                     const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
                     const std::vector<int64_t>& dilation, const CpuArray& ga,
                     const CpuArray& gw, int threads);
void pw_forward_api(const CpuArray& y, const CpuArray& w, Opt channel_scale, Opt scale, Opt bias,
                    int act, Opt residual, const CpuArray& out, int threads);
void dwsep_forward_api(const CpuArray& x, const CpuArray& taps, const CpuArray& pw, Opt dw_scale,
                       Opt dw_bias, Opt pw_scale, Opt pw_bias, Opt residual,
                       const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
                       const std::vector<int64_t>& dilation, int act, int pw_act, bool preact,
                       const CpuArray& out, int threads);

// The instruction set the GEMM tiles (and with it the kernels' clones) use on this CPU.
const char* cpu_isa_name();

}  // namespace effops::dwsep
