// Array-level entry points of the detection losses (checked shapes/dtypes, dispatch).
#pragma once
#include <optional>

#include "common/ndarray.h"
#include "losses/losses.h"  // focal_rows_per_task, box_rows_per_task (bound as-is)

namespace effops::losses {

// Returns -1, or a class >= C found in the class-index targets (the caller raises).
int64_t focal_loss_api(const CpuArray& logits, const CpuArray& targets, std::optional<CpuArray> ignore,
                       double alpha, double gamma, double label_smoothing, std::optional<CpuArray> loss_out,
                       std::optional<CpuArray> partial, std::optional<CpuArray> grad, int threads);
void focal_scale_api(const CpuArray& src, double factor, const CpuArray& dst, int threads);
void box_loss_api(const CpuArray& pred, const CpuArray& target, const CpuArray& mask, int kind, double delta,
                  std::optional<CpuArray> loss_out, std::optional<CpuArray> partial, std::optional<CpuArray> grad,
                  int threads);
void match_anchors_api(const CpuArray& anchors, const CpuArray& gt_boxes, const CpuArray& labels,
                       const CpuArray& valid, double match_threshold, double unmatched_threshold,
                       int64_t ignored_class, const CpuArray& cls_out, const CpuArray& box_out,
                       const CpuArray& npos_out, int threads);

}  // namespace effops::losses
