// Array-level CUDA entry points of the NMS family (checked shapes/dtypes, dtype dispatch).
#pragma once
#include <cstdint>

#include "common/ndarray.h"

namespace effops::cuda::nms {

using CudaArray = nb::ndarray<nb::c_contig, nb::device::cuda>;

void nms_keep_api(const CudaArray& boxes, const CudaArray& seg_end, const CudaArray& counts,
                  double threshold, const CudaArray& mask, const CudaArray& removed,
                  const CudaArray& keep, uintptr_t stream, int device);
void soft_nms_api(const CudaArray& boxes, const CudaArray& scores, double threshold, double sigma,
                  int method, double score_threshold, const CudaArray& keep,
                  const CudaArray& scores_out, const CudaArray& work, const CudaArray& count,
                  uintptr_t stream, int device);
void matrix_decay_api(const CudaArray& boxes, const CudaArray& seg_start, int kernel, double sigma,
                      const CudaArray& cmax, const CudaArray& decay, uintptr_t stream, int device);

}  // namespace effops::cuda::nms
