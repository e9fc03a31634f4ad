// CUDA kernels of the NMS family (host launchers). Semantics: csrc/nms/nms.h; design of the
// mask/reduce pair: python/effops/ops/nms.py (_gpu_keep).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace effops::cuda::nms {

// keep[b, i] for grouped boxes [B, K, 4]: seg_end[b, i] is the exclusive end of row i's segment,
// rows >= counts[b] are ignored. mask [B, K, W] (W = ceil(K / 64)) is scratch; removed [B, W]
// must be zero on entry.
template <class T>
void nms_keep(const T* boxes, const int32_t* seg_end, const int32_t* counts, T thr,
              uint64_t* mask, uint64_t* removed, uint8_t* keep, int64_t B, int64_t K,
              cudaStream_t stream);

// Soft-NMS on one set of n boxes; work[n] is scratch; count[0] receives the number selected.
template <class T>
void soft_nms(const T* boxes, const T* scores, int64_t n, T thr, double sigma, int method,
              double score_threshold, int64_t* keep, T* scores_out, T* work, int64_t* count,
              cudaStream_t stream);

// Matrix NMS decay factors for boxes [n, 4] in score order, grouped by class; seg_start[j] is the
// first row of j's class. cmax[n] is scratch; decay[n] receives the factors.
template <class T>
void matrix_decay(const T* boxes, const int32_t* seg_start, int64_t n, int kernel, double sigma,
                  double* cmax, double* decay, cudaStream_t stream);

}  // namespace effops::cuda::nms
