// Array-level CUDA entry points of the depthwise-separable family (checks, dtype dispatch).
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "nms/nms_api_cuda.h"

namespace effops::cuda::dwsep {

using nms::CudaArray;
using OptC = std::optional<CudaArray>;
using Ints = std::vector<int64_t>;

void dwsep_forward_api(const CudaArray& x, const CudaArray& taps, const CudaArray& pw, OptC dws,
                       OptC dwb, OptC pws, OptC pwb, OptC res, const Ints& stride, const Ints& pad,
                       const Ints& dilation, int act, int pw_act, bool preact, const CudaArray& out,
                       uintptr_t stream, int device);
void dw_forward_api(const CudaArray& x, const CudaArray& taps, OptC scale, OptC bias,
                    const Ints& stride, const Ints& pad, const Ints& dilation, int act,
                    const CudaArray& y, const CudaArray& part, uintptr_t stream, int device);
void pw_forward_api(const CudaArray& a, const CudaArray& w, OptC cs, OptC scale, OptC bias,
                    int act, OptC res, const CudaArray& out, uintptr_t stream, int device);
void dw_backward_api(const CudaArray& a, const CudaArray& taps, const CudaArray& gd,
                     const Ints& stride, const Ints& pad, const Ints& dilation,
                     const CudaArray& ga, const CudaArray& part, uintptr_t stream, int device);

}  // namespace effops::cuda::dwsep
