// The argument checks of the detection-loss entry points, shared by the CPU adapter
// (losses_api.cpp) and the CUDA one (kernels/losses/losses_api_cuda.cpp): the same shapes,
// dtypes and ranges on both, one definition. Templates over the array type (CpuArray or
// CudaArray) and the backend's argument struct; what differs per backend (the partial-sum
// buffer's length and dtype, CUDA's key buffer and grid limits) is passed in or checked by the
// caller.
#pragma once
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "common/errors.h"
#include "common/ndarray.h"

namespace effops::loss_checks {

inline const auto kF32 = nb::dtype<float>();
inline const auto kI64 = nb::dtype<int64_t>();
inline const auto kU8 = nb::dtype<uint8_t>();

// focal_loss inputs: logits [N, C]; targets [N] int64 class indices or [N, C] float32; ignore
// [N] or [N, C] uint8; alpha (negative: no alpha weighting), gamma >= 0, label_smoothing in
// [0, 1]. Fills the input fields of the backend's FocalArgs (x, N, C, cls / dense, ignore,
// alpha1 / alpha0, gamma, ls_scale / ls_add); the logits' dtype is the caller's to check.
template <class A, class Args>
void focal_inputs(const char* op, const A& logits, const A& targets, const std::optional<A>& ignore, double alpha,
                  double gamma, double label_smoothing, Args& a) {
  check_shape(logits, {-1, -1}, op, "logits");
  const int64_t N = logits.shape(0), C = logits.shape(1);
  a.x = logits.data(), a.N = N, a.C = C;
  if (targets.ndim() == 1) {
    check_shape(targets, {N}, op, "targets");
    check_dtype(targets, kI64, op, "targets");
    a.cls = data_of<const int64_t>(targets);
  } else {
    check_shape(targets, {N, C}, op, "targets");
    check_dtype(targets, kF32, op, "targets");
    a.dense = data_of<const float>(targets);
  }
  if (ignore) {
    check_dtype(*ignore, kU8, op, "ignore");
    check(ignore->ndim() == 1 || ignore->ndim() == 2, op, ": ignore must be [N] or [N, C]");
    if (ignore->ndim() == 1) check_shape(*ignore, {N}, op, "ignore");
    else check_shape(*ignore, {N, C}, op, "ignore");
    a.ignore = data_of<const uint8_t>(*ignore), a.ignore_mode = static_cast<int>(ignore->ndim());
  }
  check(std::isfinite(alpha) && std::isfinite(gamma) && gamma >= 0, op, ": alpha and gamma must be finite, gamma >= 0");
  check(label_smoothing >= 0 && label_smoothing <= 1, op, ": label_smoothing must be in [0, 1]");
  if (alpha >= 0) a.alpha1 = static_cast<float>(alpha), a.alpha0 = static_cast<float>(1.0 - alpha);
  a.gamma = static_cast<float>(gamma);
  a.ls_scale = static_cast<float>(1.0 - label_smoothing), a.ls_add = static_cast<float>(0.5 * label_smoothing);
}

// focal_loss outputs: exactly one of loss_out ([N, C] float32) and partial (partial_len sums of
// partial_dtype, the backend's reduction buffer); grad [N, C] in the logits' dtype (optional).
template <class A, class Args>
void focal_outputs(const char* op, const A& logits, const std::optional<A>& loss_out, const std::optional<A>& partial,
                   const std::optional<A>& grad, int64_t partial_len, nb::dlpack::dtype partial_dtype, Args& a) {
  const int64_t N = a.N, C = a.C;
  check(loss_out.has_value() != partial.has_value(), op, ": exactly one of loss_out and partial");
  if (loss_out) {
    check_shape(*loss_out, {N, C}, op, "loss_out");
    check_dtype(*loss_out, kF32, op, "loss_out");
    a.loss = data_of<float>(*loss_out);
  } else {
    check_shape(*partial, {partial_len}, op, "partial");
    check_dtype(*partial, partial_dtype, op, "partial");
    a.partial = data_of<std::remove_pointer_t<decltype(a.partial)>>(*partial);
  }
  if (grad) {
    check_shape(*grad, {N, C}, op, "grad");
    check(grad->dtype() == logits.dtype(), op, ": grad must have the logits' dtype");
    a.grad = grad->data();
  }
}

// box_loss: pred, target [N, 4] float32; mask [N] or [N, 4] float32 (giou: per box only);
// kind 0 huber, 1 l1, 2 giou; exactly one of loss_out ([N] for giou, else [N, 4]) and partial
// (partial_len(N) sums of P: float64 on the CPU, float32 on CUDA); grad [N, 4] float32 (optional).
template <class P>
struct BoxArrays {
  int64_t N = 0;
  bool mask4 = false;
  float* loss = nullptr;
  P* partial = nullptr;
  float* grad = nullptr;
};

template <class P, class A, class Len>
BoxArrays<P> box_arrays(const char* op, const A& pred, const A& target, const A& mask, int kind,
                        const std::optional<A>& loss_out, const std::optional<A>& partial,
                        const std::optional<A>& grad, Len&& partial_len, nb::dlpack::dtype partial_dtype) {
  BoxArrays<P> r;
  check_shape(pred, {-1, 4}, op, "pred");
  const int64_t N = r.N = pred.shape(0);
  check_dtype(pred, kF32, op, "pred");
  check_shape(target, {N, 4}, op, "target");
  check_dtype(target, kF32, op, "target");
  check_dtype(mask, kF32, op, "mask");
  check(kind >= 0 && kind <= 2, op, ": kind must be 0 (huber), 1 (l1) or 2 (giou)");
  r.mask4 = mask.ndim() == 2;
  if (r.mask4) {
    check(kind != 2, op, ": giou takes a per-box mask");
    check_shape(mask, {N, 4}, op, "mask");
  } else {
    check_shape(mask, {N}, op, "mask");
  }
  check(loss_out.has_value() != partial.has_value(), op, ": exactly one of loss_out and partial");
  if (loss_out) {
    if (kind == 2) check_shape(*loss_out, {N}, op, "loss_out");
    else check_shape(*loss_out, {N, 4}, op, "loss_out");
    check_dtype(*loss_out, kF32, op, "loss_out");
    r.loss = data_of<float>(*loss_out);
  } else {
    check_shape(*partial, {partial_len(N)}, op, "partial");
    check_dtype(*partial, partial_dtype, op, "partial");
    r.partial = data_of<P>(*partial);
  }
  if (grad) {
    check_shape(*grad, {N, 4}, op, "grad");
    check_dtype(*grad, kF32, op, "grad");
    r.grad = data_of<float>(*grad);
  }
  return r;
}

// match_anchors: anchors [A, 4] float32, gt_boxes [B, G, 4] float32, labels [B, G] int64, valid
// [B, G] uint8; outputs cls_out [B, A] int64, box_out [B, A, 4] float32, npos_out [B] float32;
// at most 2^31 - 1 anchors. Returns {A, B, G}.
struct MatchSizes {
  int64_t A, B, G;
};

template <class A_>
MatchSizes match_arrays(const char* op, const A_& anchors, const A_& gt_boxes, const A_& labels, const A_& valid,
                        const A_& cls_out, const A_& box_out, const A_& npos_out) {
  check_shape(anchors, {-1, 4}, op, "anchors");
  check_dtype(anchors, kF32, op, "anchors");
  check_shape(gt_boxes, {-1, -1, 4}, op, "gt_boxes");
  check_dtype(gt_boxes, kF32, op, "gt_boxes");
  const int64_t A = anchors.shape(0), B = gt_boxes.shape(0), G = gt_boxes.shape(1);
  check(A < (int64_t{1} << 31), op, ": at most 2^31 - 1 anchors");
  check_shape(labels, {B, G}, op, "labels");
  check_dtype(labels, kI64, op, "labels");
  check_shape(valid, {B, G}, op, "valid");
  check_dtype(valid, kU8, op, "valid");
  check_shape(cls_out, {B, A}, op, "cls_out");
  check_dtype(cls_out, kI64, op, "cls_out");
  check_shape(box_out, {B, A, 4}, op, "box_out");
  check_dtype(box_out, kF32, op, "box_out");
  check_shape(npos_out, {B}, op, "npos_out");
  check_dtype(npos_out, kF32, op, "npos_out");
  return {A, B, G};
}

}  // namespace effops::loss_checks
