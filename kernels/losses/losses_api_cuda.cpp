#include "losses/losses_api_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common/cuda_check.h"
#include "common/dtype_dispatch.h"

namespace effops::cuda::losses {
namespace {

const auto kI64 = nb::dtype<int64_t>();
const auto kU8 = nb::dtype<uint8_t>();

cudaStream_t prepare(uintptr_t stream, int device, const char* op) {
  check_cuda(cudaSetDevice(device), op);
  return reinterpret_cast<cudaStream_t>(stream);
}

}  // namespace

void focal_loss_api(const CudaArray& logits, const CudaArray& targets, std::optional<CudaArray> ignore, double alpha,
                    double gamma, double label_smoothing, std::optional<CudaArray> loss_out,
                    std::optional<CudaArray> partial, std::optional<CudaArray> grad, uintptr_t stream, int device) {
  const char* op = "focal_loss";
  check_shape(logits, {-1, -1}, op, "logits");
  const int64_t N = logits.shape(0), C = logits.shape(1);
  FocalArgs a;
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
  check(loss_out.has_value() != partial.has_value(), op, ": exactly one of loss_out and partial");
  if (loss_out) {
    check_shape(*loss_out, {N, C}, op, "loss_out");
    check_dtype(*loss_out, kF32, op, "loss_out");
    a.loss = data_of<float>(*loss_out);
  } else {
    check_shape(*partial, {focal_blocks(N * C)}, op, "partial");
    check_dtype(*partial, kF32, op, "partial");
    a.partial = data_of<float>(*partial);
  }
  if (grad) {
    check_shape(*grad, {N, C}, op, "grad");
    check(grad->dtype() == logits.dtype(), op, ": grad must have the logits' dtype");
    a.grad = grad->data();
  }
  if (N * C == 0) return;
  cudaStream_t s = prepare(stream, device, op);
  dispatch_float(logits, op, "logits", [&](auto t) { focal_forward<decltype(t)>(a, s); });
}

void box_loss_api(const CudaArray& pred, const CudaArray& target, const CudaArray& mask, int kind, double delta,
                  std::optional<CudaArray> loss_out, std::optional<CudaArray> partial, std::optional<CudaArray> grad,
                  uintptr_t stream, int device) {
  const char* op = "box_loss";
  check_shape(pred, {-1, 4}, op, "pred");
  const int64_t N = pred.shape(0);
  check_dtype(pred, kF32, op, "pred");
  check_shape(target, {N, 4}, op, "target");
  check_dtype(target, kF32, op, "target");
  check_dtype(mask, kF32, op, "mask");
  check(kind >= 0 && kind <= 2, op, ": kind must be 0 (huber), 1 (l1) or 2 (giou)");
  const bool mask4 = mask.ndim() == 2;
  if (mask4) {
    check(kind != 2, op, ": giou takes a per-box mask");
    check_shape(mask, {N, 4}, op, "mask");
  } else {
    check_shape(mask, {N}, op, "mask");
  }
  check(loss_out.has_value() != partial.has_value(), op, ": exactly one of loss_out and partial");
  float* loss = nullptr;
  float* part = nullptr;
  if (loss_out) {
    if (kind == 2) check_shape(*loss_out, {N}, op, "loss_out");
    else check_shape(*loss_out, {N, 4}, op, "loss_out");
    check_dtype(*loss_out, kF32, op, "loss_out");
    loss = data_of<float>(*loss_out);
  } else {
    check_shape(*partial, {box_blocks(N)}, op, "partial");
    check_dtype(*partial, kF32, op, "partial");
    part = data_of<float>(*partial);
  }
  float* g = nullptr;
  if (grad) {
    check_shape(*grad, {N, 4}, op, "grad");
    check_dtype(*grad, kF32, op, "grad");
    g = data_of<float>(*grad);
  }
  cudaStream_t s = prepare(stream, device, op);
  box_forward(data_of<const float>(pred), data_of<const float>(target), data_of<const float>(mask), mask4, N, kind,
              static_cast<float>(delta), loss, part, g, s);
}

void match_anchors_api(const CudaArray& anchors, const CudaArray& gt_boxes, const CudaArray& labels,
                       const CudaArray& valid, double match_threshold, double unmatched_threshold,
                       int64_t ignored_class, const CudaArray& keys, const CudaArray& cls_out,
                       const CudaArray& box_out, const CudaArray& npos_out, uintptr_t stream, int device) {
  const char* op = "match_anchors";
  check_shape(anchors, {-1, 4}, op, "anchors");
  check_dtype(anchors, kF32, op, "anchors");
  check_shape(gt_boxes, {-1, -1, 4}, op, "gt_boxes");
  check_dtype(gt_boxes, kF32, op, "gt_boxes");
  const int64_t A = anchors.shape(0), B = gt_boxes.shape(0), G = gt_boxes.shape(1);
  check(A < (int64_t{1} << 31) && B < 65536, op, ": at most 2^31 - 1 anchors and 65535 images");
  check_shape(labels, {B, G}, op, "labels");
  check_dtype(labels, kI64, op, "labels");
  check_shape(valid, {B, G}, op, "valid");
  check_dtype(valid, kU8, op, "valid");
  check_shape(keys, {B, G}, op, "keys");
  check_dtype(keys, kI64, op, "keys");
  check_shape(cls_out, {B, A}, op, "cls_out");
  check_dtype(cls_out, kI64, op, "cls_out");
  check_shape(box_out, {B, A, 4}, op, "box_out");
  check_dtype(box_out, kF32, op, "box_out");
  check_shape(npos_out, {B}, op, "npos_out");
  check_dtype(npos_out, kF32, op, "npos_out");
  cudaStream_t s = prepare(stream, device, op);
  match_anchors(data_of<const float>(anchors), A, data_of<const float>(gt_boxes), data_of<const int64_t>(labels),
                data_of<const uint8_t>(valid), B, G, static_cast<float>(match_threshold),
                static_cast<float>(unmatched_threshold), ignored_class, data_of<unsigned long long>(keys),
                data_of<int64_t>(cls_out), data_of<float>(box_out), data_of<float>(npos_out), s);
}

}  // namespace effops::cuda::losses
