// Array-level CUDA entry points of the int8 convolutions (checked shapes/dtypes).
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "nms/nms_api_cuda.h"

namespace effops::cuda::qconv {

using nms::CudaArray;
using OptC = std::optional<CudaArray>;
using Ints = std::vector<int64_t>;

void q_dw_forward_api(const CudaArray& x, const CudaArray& taps, OptC bias, const CudaArray& mult, OptC lut,
                      const Ints& stride, const Ints& pad, int64_t x_zp, int64_t out_zp, int64_t qmin, int64_t qmax,
                      const CudaArray& y, const CudaArray& sums, uintptr_t stream, int device);
void q_pw_forward_api(const CudaArray& x, const CudaArray& w, OptC bias, const CudaArray& mult, OptC lut, OptC gate,
                      OptC residual, int64_t x_zp, int64_t out_zp, int64_t qmin, int64_t qmax, int64_t res_zp,
                      double res_mult, const CudaArray& out, uintptr_t stream, int device);

}  // namespace effops::cuda::qconv
