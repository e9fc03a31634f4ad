// Box regression losses: effdet's Huber and L1 per coordinate, torchvision's GIoU per box, times
// the mask, with the gradient in the same pass (formulas: ops/_losses_ref.py). Memory bound
// (16 bytes in, 16 out per box): scalar code that GCC vectorises, tasks of 16k boxes with one
// float64 partial sum each (added in task order: the same sum for any thread count).
#include <algorithm>
#include <cmath>

#include "common/parallel.h"
#include "losses/losses.h"

namespace effops::losses {
namespace {

constexpr int64_t kBoxesPerTask = 1 << 14;
constexpr float kGiouEps = 1e-7f;

// d max(a, b) / da as torch's autograd defines it: 1, 0, 1/2 on ties.
inline float dmax(float a, float b) { return a > b ? 1.0f : (a == b ? 0.5f : 0.0f); }

inline float giou_box(const float* p, const float* g, float* d) {
  const float x1 = p[0], y1 = p[1], x2 = p[2], y2 = p[3];
  const float gx1 = g[0], gy1 = g[1], gx2 = g[2], gy2 = g[3];
  const float ix1 = std::max(x1, gx1), iy1 = std::max(y1, gy1);
  const float ix2 = std::min(x2, gx2), iy2 = std::min(y2, gy2);
  const float iw = ix2 - ix1, ih = iy2 - iy1;
  const bool over = iw > 0.0f && ih > 0.0f;
  const float inter = over ? iw * ih : 0.0f;
  const float pw = x2 - x1, ph = y2 - y1;
  const float uni = pw * ph + (gx2 - gx1) * (gy2 - gy1) - inter;
  const float iou = inter / (uni + kGiouEps);
  const float cw = std::max(x2, gx2) - std::min(x1, gx1), ch = std::max(y2, gy2) - std::min(y1, gy1);
  const float area_c = cw * ch;
  const float loss = 1.0f - (iou - (area_c - uni) / (area_c + kGiouEps));
  if (d) {
    const float ue = uni + kGiouEps, ce = area_c + kGiouEps;
    const float gi = over ? -1.0f / ue - inter / (ue * ue) + 1.0f / ce : 0.0f;
    const float ga = inter / (ue * ue) - 1.0f / ce;
    const float gc = ue / (ce * ce);
    d[0] = -gi * ih * dmax(x1, gx1) - ga * ph - gc * ch * dmax(-x1, -gx1);
    d[1] = -gi * iw * dmax(y1, gy1) - ga * pw - gc * cw * dmax(-y1, -gy1);
    d[2] = gi * ih * dmax(-x2, -gx2) + ga * ph + gc * ch * dmax(x2, gx2);
    d[3] = gi * iw * dmax(-y2, -gy2) + ga * pw + gc * cw * dmax(y2, gy2);
  }
  return loss;
}

}  // namespace

int64_t box_rows_per_task() { return kBoxesPerTask; }

void box_forward(const float* pred, const float* target, const float* mask, bool mask4, int64_t N, int kind,
                 float delta, float* loss, double* partial, float* grad, int threads) {
  const int64_t tasks = (N + kBoxesPerTask - 1) / kBoxesPerTask;
  parallel_for(tasks, threads, [&](int64_t task, int) {
    const int64_t i0 = task * kBoxesPerTask, i1 = std::min(N, i0 + kBoxesPerTask);
    double total = 0.0;
    if (kind == 2) {
      for (int64_t i = i0; i < i1; ++i) {
        float d[4];
        const float m = mask[i];
        float l = giou_box(pred + 4 * i, target + 4 * i, grad ? d : nullptr) * m;
        if (loss) loss[i] = l;
        else total += l;
        if (grad)
          for (int c = 0; c < 4; ++c) grad[4 * i + c] = d[c] * m;
      }
    } else {
      double acc = 0.0;
      for (int64_t j = 4 * i0; j < 4 * i1; ++j) {
        const float m = mask4 ? mask[j] : mask[j >> 2];
        const float e = pred[j] - target[j];
        const float a = std::fabs(e);
        float l, g;
        if (kind == 0) {
          const float q = std::min(a, delta);
          l = 0.5f * q * q + delta * (a - q);
          g = std::min(std::max(e, -delta), delta);
        } else {
          l = a;
          g = e > 0.0f ? 1.0f : (e < 0.0f ? -1.0f : 0.0f);
        }
        l *= m;
        if (loss) loss[j] = l;
        else acc += l;
        if (grad) grad[j] = g * m;
      }
      total = acc;
    }
    if (partial) partial[task] = total;
  });
}

}  // namespace effops::losses
