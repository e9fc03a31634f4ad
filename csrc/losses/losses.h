// CPU kernels of the detection losses (semantics and formulas: python/effops/ops/_losses_ref.py).
#pragma once
#include <atomic>
#include <cstdint>

namespace effops::losses {

// Focal loss over N rows of C logits. Targets: class indices (cls, int64 [N]) or dense float32
// (dense, [N, C]); ignore: none (mode 0), per row (1, uint8 [N]) or per element (2, [N, C]).
// Writes the per-element loss (loss, float32 [N, C]) or per-task partial sums (partial[task],
// float64; tasks as focal_tasks gives them), and the per-element gradient (grad, the logits'
// storage type) when grad is not null. bad_class: set to a class >= C found in cls (else -1).
struct FocalArgs {
  const void* x = nullptr;  // float / bf16 bits / _Float16, [N, C]
  const int64_t* cls = nullptr;
  const float* dense = nullptr;
  const uint8_t* ignore = nullptr;
  int ignore_mode = 0;
  int64_t N = 0, C = 0;
  float alpha1 = 1.0f, alpha0 = 1.0f;  // a_t = alpha1 t + alpha0 (1 - t)
  float gamma = 0.0f;
  int gmode = 0;  // 0: gamma 0, 1: gamma 1, 2: gamma 2, 3: any other (exp(gamma log q))
  float ls_scale = 1.0f, ls_add = 0.0f;  // t_s = t ls_scale + ls_add
  float* loss = nullptr;
  void* grad = nullptr;
  double* partial = nullptr;
  std::atomic<int64_t>* bad_class = nullptr;
};

enum Storage : int { kStoreF32 = 0, kStoreBF16 = 1, kStoreF16 = 2 };

// Number of tasks (rows per task) focal_forward splits N x C into.
int64_t focal_rows_per_task(int64_t C);
void focal_forward(const FocalArgs& a, int storage, int threads);
// dst = src * factor over n elements of one storage type (the focal backward for a reduced loss:
// the saved gradient times the incoming scalar, into a fresh - huge-page advised - buffer).
void scale_grad(const void* src, int storage, int64_t n, float factor, void* dst, int threads);

// Box losses over N boxes (float32 [N, 4]); mask float32 [N] (per box) or [N, 4] (mask4).
// kind 0 huber, 1 l1, 2 giou. Writes loss ([N, 4] or [N] for giou) or per-task partials,
// and grad (float32 [N, 4]) when not null.
int64_t box_rows_per_task();
void box_forward(const float* pred, const float* target, const float* mask, bool mask4, int64_t N,
                 int kind, float delta, float* loss, double* partial, float* grad, int threads);

// effdet's AnchorLabeler for B images: anchors float32 [A, 4], gt [B, G, 4] (both y1 x1 y2 x2),
// labels int64 [B, G], valid uint8 [B, G]. Outputs cls int64 [B, A], box float32 [B, A, 4],
// npos float32 [B].
void match_anchors(const float* anchors, int64_t A, const float* gt, const int64_t* labels,
                   const uint8_t* valid, int64_t B, int64_t G, float match_thr, float unmatched_thr,
                   int64_t ignored_class, int64_t* cls, float* box, float* npos, int threads);

}  // namespace effops::losses
