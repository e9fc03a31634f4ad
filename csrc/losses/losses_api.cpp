#include "losses/losses_api.h"

#include <atomic>
#include <cmath>

#include "losses/losses.h"

namespace effops::losses {
namespace {

const nb::dlpack::dtype kBF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
const nb::dlpack::dtype kF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
const auto kF32 = nb::dtype<float>();
const auto kF64 = nb::dtype<double>();
const auto kI64 = nb::dtype<int64_t>();
const auto kU8 = nb::dtype<uint8_t>();

int storage_of(const CpuArray& x, const char* op, const char* name) {
  if (x.dtype() == kF32) return kStoreF32;
  if (x.dtype() == kBF16) return kStoreBF16;
  if (x.dtype() == kF16) return kStoreF16;
  fail(op, ": ", name, " must be float32, bfloat16 or float16, got ", dtype_name(x.dtype()));
}

}  // namespace

int64_t focal_loss_api(const CpuArray& logits, const CpuArray& targets, std::optional<CpuArray> ignore,
                       double alpha, double gamma, double label_smoothing, std::optional<CpuArray> loss_out,
                       std::optional<CpuArray> partial, std::optional<CpuArray> grad, int threads) {
  const char* op = "focal_loss";
  check_shape(logits, {-1, -1}, op, "logits");
  const int64_t N = logits.shape(0), C = logits.shape(1);
  const int storage = storage_of(logits, op, "logits");
  FocalArgs a;
  a.x = logits.data();
  a.N = N, a.C = C;
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
    a.ignore = data_of<const uint8_t>(*ignore);
    a.ignore_mode = static_cast<int>(ignore->ndim());
  }
  check(std::isfinite(alpha) && std::isfinite(gamma) && gamma >= 0, op, ": alpha and gamma must be finite, gamma >= 0");
  check(label_smoothing >= 0 && label_smoothing <= 1, op, ": label_smoothing must be in [0, 1]");
  if (alpha >= 0) a.alpha1 = static_cast<float>(alpha), a.alpha0 = static_cast<float>(1.0 - alpha);
  a.gamma = static_cast<float>(gamma);
  a.gmode = gamma == 0 ? 0 : gamma == 1 ? 1 : gamma == 2 ? 2 : 3;
  a.ls_scale = static_cast<float>(1.0 - label_smoothing);
  a.ls_add = static_cast<float>(0.5 * label_smoothing);
  check(loss_out.has_value() != partial.has_value(), op, ": exactly one of loss_out and partial");
  if (loss_out) {
    check_shape(*loss_out, {N, C}, op, "loss_out");
    check_dtype(*loss_out, kF32, op, "loss_out");
    a.loss = data_of<float>(*loss_out);
  } else {
    const int64_t rpt = focal_rows_per_task(C);
    check_shape(*partial, {(N + rpt - 1) / rpt}, op, "partial");
    check_dtype(*partial, kF64, op, "partial");
    a.partial = data_of<double>(*partial);
  }
  if (grad) {
    check_shape(*grad, {N, C}, op, "grad");
    check(grad->dtype() == logits.dtype(), op, ": grad must have the logits' dtype");
    a.grad = grad->data();
  }
  std::atomic<int64_t> bad{-1};
  a.bad_class = &bad;
  focal_forward(a, storage, threads);
  return bad.load();
}

void focal_scale_api(const CpuArray& src, double factor, const CpuArray& dst, int threads) {
  const char* op = "focal_scale";
  check(dst.dtype() == src.dtype(), op, ": dst must have src's dtype");
  check(dst.size() == src.size(), op, ": dst must have src's size");
  scale_grad(src.data(), storage_of(src, op, "src"), static_cast<int64_t>(src.size()), static_cast<float>(factor),
             dst.data(), threads);
}

void box_loss_api(const CpuArray& pred, const CpuArray& target, const CpuArray& mask, int kind, double delta,
                  std::optional<CpuArray> loss_out, std::optional<CpuArray> partial, std::optional<CpuArray> grad,
                  int threads) {
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
  double* part = nullptr;
  if (loss_out) {
    if (kind == 2) check_shape(*loss_out, {N}, op, "loss_out");
    else check_shape(*loss_out, {N, 4}, op, "loss_out");
    check_dtype(*loss_out, kF32, op, "loss_out");
    loss = data_of<float>(*loss_out);
  } else {
    const int64_t per = box_rows_per_task();
    check_shape(*partial, {(N + per - 1) / per}, op, "partial");
    check_dtype(*partial, kF64, op, "partial");
    part = data_of<double>(*partial);
  }
  float* g = nullptr;
  if (grad) {
    check_shape(*grad, {N, 4}, op, "grad");
    check_dtype(*grad, kF32, op, "grad");
    g = data_of<float>(*grad);
  }
  box_forward(data_of<const float>(pred), data_of<const float>(target), data_of<const float>(mask), mask4, N, kind,
              static_cast<float>(delta), loss, part, g, threads);
}

void match_anchors_api(const CpuArray& anchors, const CpuArray& gt_boxes, const CpuArray& labels,
                       const CpuArray& valid, double match_threshold, double unmatched_threshold,
                       int64_t ignored_class, const CpuArray& cls_out, const CpuArray& box_out,
                       const CpuArray& npos_out, int threads) {
  const char* op = "match_anchors";
  check_shape(anchors, {-1, 4}, op, "anchors");
  check_dtype(anchors, kF32, op, "anchors");
  check_shape(gt_boxes, {-1, -1, 4}, op, "gt_boxes");
  check_dtype(gt_boxes, kF32, op, "gt_boxes");
  const int64_t A = anchors.shape(0), B = gt_boxes.shape(0), G = gt_boxes.shape(1);
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
  check(A < (int64_t{1} << 31), op, ": at most 2^31 - 1 anchors");
  // effdet compares float32 IoUs with the Python thresholds rounded to float32
  match_anchors(data_of<const float>(anchors), A, data_of<const float>(gt_boxes), data_of<const int64_t>(labels),
                data_of<const uint8_t>(valid), B, G, static_cast<float>(match_threshold),
                static_cast<float>(unmatched_threshold), ignored_class, data_of<int64_t>(cls_out),
                data_of<float>(box_out), data_of<float>(npos_out), threads);
}

}  // namespace effops::losses
