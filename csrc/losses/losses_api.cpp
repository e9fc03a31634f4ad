#include "losses/losses_api.h"

#include <atomic>

#include "losses/losses.h"
#include "losses/losses_checks.h"

namespace effops::losses {
namespace {

const nb::dlpack::dtype kBF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
const nb::dlpack::dtype kF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
const auto kF64 = nb::dtype<double>();
using loss_checks::kF32;

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
  FocalArgs a;
  loss_checks::focal_inputs(op, logits, targets, ignore, alpha, gamma, label_smoothing, a);
  const int storage = storage_of(logits, op, "logits");
  a.gmode = gamma == 0 ? 0 : gamma == 1 ? 1 : gamma == 2 ? 2 : 3;
  const int64_t rpt = focal_rows_per_task(a.C);
  loss_checks::focal_outputs(op, logits, loss_out, partial, grad, (a.N + rpt - 1) / rpt, kF64, a);
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
  const auto r = loss_checks::box_arrays<double>(
      "box_loss", pred, target, mask, kind, loss_out, partial, grad,
      [](int64_t N) { const int64_t per = box_rows_per_task(); return (N + per - 1) / per; }, kF64);
  box_forward(data_of<const float>(pred), data_of<const float>(target), data_of<const float>(mask), r.mask4, r.N,
              kind, static_cast<float>(delta), r.loss, r.partial, r.grad, threads);
}

void match_anchors_api(const CpuArray& anchors, const CpuArray& gt_boxes, const CpuArray& labels,
                       const CpuArray& valid, double match_threshold, double unmatched_threshold,
                       int64_t ignored_class, const CpuArray& cls_out, const CpuArray& box_out,
                       const CpuArray& npos_out, int threads) {
  const auto [A, B, G] = loss_checks::match_arrays("match_anchors", anchors, gt_boxes, labels, valid, cls_out,
                                                    box_out, npos_out);
  // effdet compares float32 IoUs with the Python thresholds rounded to float32
  match_anchors(data_of<const float>(anchors), A, data_of<const float>(gt_boxes), data_of<const int64_t>(labels),
                data_of<const uint8_t>(valid), B, G, static_cast<float>(match_threshold),
                static_cast<float>(unmatched_threshold), ignored_class, data_of<int64_t>(cls_out),
                data_of<float>(box_out), data_of<float>(npos_out), threads);
}

}  // namespace effops::losses
