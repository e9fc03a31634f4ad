#include "nms/nms_api.h"

#include <cmath>

#include "nms/nms.h"

namespace effops::nms {
namespace {

const auto kI64 = nb::dtype<int64_t>();

// boxes [n, 4] and scores [n] of one float dtype; returns n.
int64_t check_boxes_scores(const CpuArray& boxes, const CpuArray& scores, const char* op) {
  check_shape(boxes, {-1, 4}, op, "boxes");
  check_shape(scores, {static_cast<int64_t>(boxes.shape(0))}, op, "scores");
  check(boxes.dtype() == scores.dtype(), op, ": boxes and scores must have the same dtype");
  return static_cast<int64_t>(boxes.shape(0));
}

}  // namespace

int64_t nms_api(const CpuArray& boxes, const CpuArray& scores, double thr,
                const CpuArray& keep_out, int threads) {
  const int64_t n = check_boxes_scores(boxes, scores, "nms");
  check_shape(keep_out, {n}, "nms", "keep_out");
  check_dtype(keep_out, kI64, "nms", "keep_out");
  return dispatch_float(boxes, "nms", "boxes", [&](auto t) {
    using T = decltype(t);
    return nms<T>(data_of<T>(boxes), data_of<T>(scores), n, thr, data_of<int64_t>(keep_out),
                  threads);
  });
}

int64_t batched_nms_api(const CpuArray& boxes, const CpuArray& scores, const CpuArray& idxs,
                        double thr, const CpuArray& keep_out, int threads) {
  const int64_t n = check_boxes_scores(boxes, scores, "batched_nms");
  check_shape(idxs, {n}, "batched_nms", "idxs");
  check_dtype(idxs, kI64, "batched_nms", "idxs");
  check_shape(keep_out, {n}, "batched_nms", "keep_out");
  check_dtype(keep_out, kI64, "batched_nms", "keep_out");
  return dispatch_float(boxes, "batched_nms", "boxes", [&](auto t) {
    using T = decltype(t);
    return batched_nms<T>(data_of<T>(boxes), data_of<T>(scores), data_of<int64_t>(idxs), n, thr,
                          data_of<int64_t>(keep_out), threads);
  });
}

void multiclass_nms_api(const CpuArray& boxes, const CpuArray& scores, double thr,
                        double score_thr, int64_t pre_k, bool agnostic, const CpuArray& num_out,
                        const CpuArray& boxes_out, const CpuArray& scores_out,
                        const CpuArray& classes_out, const CpuArray& indices_out, int threads) {
  const char* op = "multiclass_nms";
  check(scores.ndim() == 3, op, ": scores must be [B, N, C]");
  const int64_t B = scores.shape(0), N = scores.shape(1), C = scores.shape(2);
  const bool per_class = boxes.ndim() == 4;
  if (per_class)
    check_shape(boxes, {B, N, C, 4}, op, "boxes");
  else
    check_shape(boxes, {B, N, 4}, op, "boxes");
  check(boxes.dtype() == scores.dtype(), op, ": boxes and scores must have the same dtype");
  check(C > 0, op, ": scores must have at least one class");
  // Any k >= N * C keeps every candidate (the same result as N * C); clamping keeps the
  // selection's arithmetic (k + slack, histogram counts) inside int64 for k near INT64_MAX.
  if (pre_k > N * C) pre_k = N * C;
  check_shape(num_out, {B}, op, "num_detections");
  const int64_t M = boxes_out.ndim() == 3 ? static_cast<int64_t>(boxes_out.shape(1)) : -1;
  check_shape(boxes_out, {B, M, 4}, op, "boxes_out");
  check_shape(scores_out, {B, M}, op, "scores_out");
  check_shape(classes_out, {B, M}, op, "classes_out");
  check_shape(indices_out, {B, M}, op, "indices_out");
  check_dtype(num_out, kI64, op, "num_detections");
  check_dtype(classes_out, kI64, op, "classes_out");
  check_dtype(indices_out, kI64, op, "indices_out");
  check(boxes_out.dtype() == boxes.dtype() && scores_out.dtype() == boxes.dtype(), op,
        ": boxes_out and scores_out must have the dtype of boxes");
  dispatch_float(boxes, op, "boxes", [&](auto t) {
    using T = decltype(t);
    multiclass_nms<T>(data_of<T>(boxes), per_class, data_of<T>(scores), B, N, C, thr, score_thr,
                      pre_k, M, agnostic, data_of<int64_t>(num_out), data_of<T>(boxes_out),
                      data_of<T>(scores_out), data_of<int64_t>(classes_out),
                      data_of<int64_t>(indices_out), threads);
  });
}

int64_t soft_nms_api(const CpuArray& boxes, const CpuArray& scores, double thr, double sigma,
                     int method, double score_thr, const CpuArray& keep_out,
                     const CpuArray& scores_out, int threads) {
  const int64_t n = check_boxes_scores(boxes, scores, "soft_nms");
  check(method == 0 || method == 1, "soft_nms: method must be 0 (linear) or 1 (gaussian)");
  check(std::isfinite(sigma), "soft_nms: sigma must be finite");  // exp(-x^2 / inf) etc.: undefined here
  check_shape(keep_out, {n}, "soft_nms", "keep_out");
  check_dtype(keep_out, kI64, "soft_nms", "keep_out");
  check_shape(scores_out, {n}, "soft_nms", "scores_out");
  check(scores_out.dtype() == boxes.dtype(), "soft_nms: scores_out must have the dtype of boxes");
  return dispatch_float(boxes, "soft_nms", "boxes", [&](auto t) {
    using T = decltype(t);
    return soft_nms<T>(data_of<T>(boxes), data_of<T>(scores), n, thr, sigma, method, score_thr,
                       data_of<int64_t>(keep_out), data_of<T>(scores_out), threads);
  });
}

void matrix_nms_api(const CpuArray& boxes, const CpuArray& scores, std::optional<CpuArray> idxs,
                    int kernel, double sigma, const CpuArray& scores_out, int threads) {
  const int64_t n = check_boxes_scores(boxes, scores, "matrix_nms");
  check(kernel == 0 || kernel == 1, "matrix_nms: kernel must be 0 (linear) or 1 (gaussian)");
  // exp(-inf * 0) is NaN, and std::min and torch.min treat NaN differently: a non-finite sigma
  // has no agreed result, so it is refused (as in Python).
  check(std::isfinite(sigma), "matrix_nms: sigma must be finite");
  if (idxs) {
    check_shape(*idxs, {n}, "matrix_nms", "idxs");
    check_dtype(*idxs, kI64, "matrix_nms", "idxs");
  }
  check_shape(scores_out, {n}, "matrix_nms", "scores_out");
  check(scores_out.dtype() == boxes.dtype(), "matrix_nms: scores_out must have the dtype of boxes");
  dispatch_float(boxes, "matrix_nms", "boxes", [&](auto t) {
    using T = decltype(t);
    matrix_nms<T>(data_of<T>(boxes), data_of<T>(scores), idxs ? data_of<int64_t>(*idxs) : nullptr,
                  n, kernel, sigma, data_of<T>(scores_out), threads);
  });
}

}  // namespace effops::nms
