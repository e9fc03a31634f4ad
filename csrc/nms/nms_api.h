// Array-level entry points of the NMS family (checked shapes/dtypes, dtype dispatch).
#pragma once
#include <optional>
#include <vector>

#include "common/ndarray.h"

namespace effops::nms {

int64_t nms_api(const CpuArray& boxes, const CpuArray& scores, double iou_threshold,
                const CpuArray& keep_out, int threads);
int64_t batched_nms_api(const CpuArray& boxes, const CpuArray& scores, const CpuArray& idxs,
                        double iou_threshold, const CpuArray& keep_out, int threads);
void multiclass_nms_api(const CpuArray& boxes, const CpuArray& scores, double iou_threshold,
                        double score_threshold, int64_t pre_nms_top_k, bool class_agnostic,
                        const CpuArray& num_out, const CpuArray& boxes_out,
                        const CpuArray& scores_out, const CpuArray& classes_out,
                        const CpuArray& indices_out, int threads);
int64_t soft_nms_api(const CpuArray& boxes, const CpuArray& scores, double iou_threshold,
                     double sigma, int method, double score_threshold, const CpuArray& keep_out,
                     const CpuArray& scores_out, int threads);
void matrix_nms_api(const CpuArray& boxes, const CpuArray& scores,
                    std::optional<CpuArray> idxs, int kernel, double sigma,
                    const CpuArray& scores_out, int threads);

// EfficientDet's post-processing candidates (topk.cpp): levels [B, N_l, C] float32; outputs
// top_anchor [B, min(k, N)] ascending, pos and vals [B, k] best first.
void topk_candidates_api(const std::vector<CpuArray>& levels, int64_t k, const CpuArray& top_anchor,
                         const CpuArray& pos, const CpuArray& vals, int threads);

}  // namespace effops::nms
