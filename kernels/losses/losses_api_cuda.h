// Array-level CUDA entry points of the detection losses.
#pragma once
#include <cstdint>
#include <optional>

#include "losses/losses.cuh"
#include "nms/nms_api_cuda.h"

namespace effops::cuda::losses {

using nms::CudaArray;

void focal_loss_api(const CudaArray& logits, const CudaArray& targets, std::optional<CudaArray> ignore, double alpha,
                    double gamma, double label_smoothing, std::optional<CudaArray> loss_out,
                    std::optional<CudaArray> partial, std::optional<CudaArray> grad, uintptr_t stream, int device);
void box_loss_api(const CudaArray& pred, const CudaArray& target, const CudaArray& mask, int kind, double delta,
                  std::optional<CudaArray> loss_out, std::optional<CudaArray> partial, std::optional<CudaArray> grad,
                  uintptr_t stream, int device);
void match_anchors_api(const CudaArray& anchors, const CudaArray& gt_boxes, const CudaArray& labels,
                       const CudaArray& valid, double match_threshold, double unmatched_threshold,
                       int64_t ignored_class, const CudaArray& keys, const CudaArray& cls_out,
                       const CudaArray& box_out, const CudaArray& npos_out, uintptr_t stream, int device);

}  // namespace effops::cuda::losses
