#include "nms/nms_api_cuda.h"

#include "common/cuda_check.h"
#include "nms/nms.cuh"

namespace effops::cuda::nms {
namespace {

const auto kI64 = nb::dtype<int64_t>();
const auto kI32 = nb::dtype<int32_t>();
const auto kU8 = nb::dtype<uint8_t>();
const auto kF64 = nb::dtype<double>();

cudaStream_t prepare(uintptr_t stream, int device, const char* op) {
  check_cuda(cudaSetDevice(device), op);
  return reinterpret_cast<cudaStream_t>(stream);
}

}  // namespace

void nms_keep_api(const CudaArray& boxes, const CudaArray& seg_end, const CudaArray& counts,
                  double thr, const CudaArray& mask, const CudaArray& removed,
                  const CudaArray& keep, uintptr_t stream, int device) {
  const char* op = "nms_keep";
  check(boxes.ndim() == 3 && boxes.shape(2) == 4, op, ": boxes must be [B, K, 4]");
  const int64_t B = boxes.shape(0), K = boxes.shape(1), W = (K + 63) / 64;
  check_shape(seg_end, {B, K}, op, "seg_end");
  check_dtype(seg_end, kI32, op, "seg_end");
  check_shape(counts, {B}, op, "counts");
  check_dtype(counts, kI32, op, "counts");
  check_shape(mask, {B, K, W}, op, "mask");
  check_dtype(mask, kI64, op, "mask");
  check_shape(removed, {B, W}, op, "removed");
  check_dtype(removed, kI64, op, "removed");
  check_shape(keep, {B, K}, op, "keep");
  check_dtype(keep, kU8, op, "keep");
  cudaStream_t s = prepare(stream, device, op);
  dispatch_float(boxes, op, "boxes", [&](auto t) {
    using T = decltype(t);
    nms_keep<T>(data_of<T>(boxes), data_of<int32_t>(seg_end), data_of<int32_t>(counts),
                static_cast<T>(thr), data_of<uint64_t>(mask), data_of<uint64_t>(removed),
                data_of<uint8_t>(keep), B, K, s);
  });
}

void soft_nms_api(const CudaArray& boxes, const CudaArray& scores, double thr, double sigma,
                  int method, double score_thr, const CudaArray& keep, const CudaArray& out,
                  const CudaArray& work, const CudaArray& count, uintptr_t stream, int device) {
  const char* op = "soft_nms";
  check_shape(boxes, {-1, 4}, op, "boxes");
  const int64_t n = boxes.shape(0);
  check_shape(scores, {n}, op, "scores");
  check(scores.dtype() == boxes.dtype() && out.dtype() == boxes.dtype() &&
            work.dtype() == boxes.dtype(),
        op, ": scores, scores_out and work must have the dtype of boxes");
  check_shape(keep, {n}, op, "keep");
  check_dtype(keep, kI64, op, "keep");
  check_shape(out, {n}, op, "scores_out");
  check_shape(work, {n}, op, "work");
  check_shape(count, {1}, op, "count");
  check_dtype(count, kI64, op, "count");
  check(method == 0 || method == 1, op, ": method must be 0 (linear) or 1 (gaussian)");
  cudaStream_t s = prepare(stream, device, op);
  dispatch_float(boxes, op, "boxes", [&](auto t) {
    using T = decltype(t);
    soft_nms<T>(data_of<T>(boxes), data_of<T>(scores), n, static_cast<T>(thr), sigma, method,
                score_thr, data_of<int64_t>(keep), data_of<T>(out), data_of<T>(work),
                data_of<int64_t>(count), s);
  });
}

void matrix_decay_api(const CudaArray& boxes, const CudaArray& seg_start, int kernel, double sigma,
                      const CudaArray& cmax, const CudaArray& decay, uintptr_t stream,
                      int device) {
  const char* op = "matrix_nms";
  check_shape(boxes, {-1, 4}, op, "boxes");
  const int64_t n = boxes.shape(0);
  check_shape(seg_start, {n}, op, "seg_start");
  check_dtype(seg_start, kI32, op, "seg_start");
  check_shape(cmax, {n}, op, "cmax");
  check_dtype(cmax, kF64, op, "cmax");
  check_shape(decay, {n}, op, "decay");
  check_dtype(decay, kF64, op, "decay");
  check(kernel == 0 || kernel == 1, op, ": kernel must be 0 (linear) or 1 (gaussian)");
  cudaStream_t s = prepare(stream, device, op);
  dispatch_float(boxes, op, "boxes", [&](auto t) {
    using T = decltype(t);
    matrix_decay<T>(data_of<T>(boxes), data_of<int32_t>(seg_start), n, kernel, sigma,
                    data_of<double>(cmax), data_of<double>(decay), s);
  });
}

}  // namespace effops::cuda::nms
