// CUDA kernels of the detection losses (semantics and formulas: python/effops/ops/_losses_ref.py).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace effops::cuda::losses {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;

// Blocks of the focal / box launches (the length of their partial-sum outputs).
int64_t focal_blocks(int64_t n);
int64_t box_blocks(int64_t n);
int64_t match_blocks(int64_t A);

struct FocalArgs {
  const void* x = nullptr;  // [N, C] float / __half / __nv_bfloat16
  const int64_t* cls = nullptr;
  const float* dense = nullptr;
  const uint8_t* ignore = nullptr;
  int ignore_mode = 0;
  int64_t N = 0, C = 0;
  float alpha1 = 1.f, alpha0 = 1.f, gamma = 0.f, ls_scale = 1.f, ls_add = 0.f;
  float* loss = nullptr;     // per element, or null
  float* partial = nullptr;  // per block sums, or null
  void* grad = nullptr;      // logits' storage type, or null
};

template <class T>
void focal_forward(const FocalArgs& a, cudaStream_t stream);

void box_forward(const float* pred, const float* target, const float* mask, bool mask4, int64_t N, int kind,
                 float delta, float* loss, float* partial, float* grad, cudaStream_t stream);

// keys: int64 [B, G] zeroed by the caller (per gt: IoU bits << 32 | ~anchor, atomicMax); npos
// float32 [B] zeroed by the caller.
void match_anchors(const float* anchors, int64_t A, const float* gt, const int64_t* labels, const uint8_t* valid,
                   int64_t B, int64_t G, float match_thr, float unmatched_thr, int64_t ignored_class,
                   unsigned long long* keys, int64_t* cls, float* box, float* npos, cudaStream_t stream);

}  // namespace effops::cuda::losses
