#include "losses/losses_api_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_check.h"
#include "common/dtype_dispatch.h"
#include "losses/losses_checks.h"

namespace effops::cuda::losses {
namespace {

using loss_checks::kI64;

cudaStream_t prepare(uintptr_t stream, int device, const char* op) {
  check_cuda(cudaSetDevice(device), op);
  return reinterpret_cast<cudaStream_t>(stream);
}

}  // namespace

void focal_loss_api(const CudaArray& logits, const CudaArray& targets, std::optional<CudaArray> ignore, double alpha,
                    double gamma, double label_smoothing, std::optional<CudaArray> loss_out,
                    std::optional<CudaArray> partial, std::optional<CudaArray> grad, uintptr_t stream, int device) {
  const char* op = "focal_loss";
  FocalArgs a;
  loss_checks::focal_inputs(op, logits, targets, ignore, alpha, gamma, label_smoothing, a);
  loss_checks::focal_outputs(op, logits, loss_out, partial, grad, focal_blocks(a.N * a.C), kF32, a);
  if (a.N * a.C == 0) return;
  cudaStream_t s = prepare(stream, device, op);
  dispatch_float(logits, op, "logits", [&](auto t) { focal_forward<decltype(t)>(a, s); });
}

void box_loss_api(const CudaArray& pred, const CudaArray& target, const CudaArray& mask, int kind, double delta,
                  std::optional<CudaArray> loss_out, std::optional<CudaArray> partial, std::optional<CudaArray> grad,
                  uintptr_t stream, int device) {
  const char* op = "box_loss";
  const auto r = loss_checks::box_arrays<float>(op, pred, target, mask, kind, loss_out, partial, grad,
                                                [](int64_t N) { return box_blocks(N); }, kF32);
  cudaStream_t s = prepare(stream, device, op);
  box_forward(data_of<const float>(pred), data_of<const float>(target), data_of<const float>(mask), r.mask4, r.N,
              kind, static_cast<float>(delta), r.loss, r.partial, r.grad, s);
}

void match_anchors_api(const CudaArray& anchors, const CudaArray& gt_boxes, const CudaArray& labels,
                       const CudaArray& valid, double match_threshold, double unmatched_threshold,
                       int64_t ignored_class, const CudaArray& keys, const CudaArray& cls_out,
                       const CudaArray& box_out, const CudaArray& npos_out, uintptr_t stream, int device) {
  const char* op = "match_anchors";
  const auto [A, B, G] = loss_checks::match_arrays(op, anchors, gt_boxes, labels, valid, cls_out, box_out, npos_out);
  check(B < 65536, op, ": at most 65535 images");
  check_shape(keys, {B, G}, op, "keys");
  check_dtype(keys, kI64, op, "keys");
  cudaStream_t s = prepare(stream, device, op);
  match_anchors(data_of<const float>(anchors), A, data_of<const float>(gt_boxes), data_of<const int64_t>(labels),
                data_of<const uint8_t>(valid), B, G, static_cast<float>(match_threshold),
                static_cast<float>(unmatched_threshold), ignored_class, data_of<unsigned long long>(keys),
                data_of<int64_t>(cls_out), data_of<float>(box_out), data_of<float>(npos_out), s);
}

}  // namespace effops::cuda::losses
