// effdet's AnchorLabeler (IouSimilarity + ArgMaxMatcher(force_match_for_each_row) +
// FasterRcnnBoxCoder), batched over images (semantics: ops/_losses_ref.py).
//
// Pass 1, parallel over (image, block of 256 anchors): the IoU of every anchor of the block with
// every valid gt, with effdet's operation order (this file is compiled without FMA contraction,
// so the float32 IoUs - and so every threshold decision and tie - are effdet's bit for bit). In
// the same loop: each anchor's best gt (strict >: the first gt wins ties, torch.max's rule) and
// each gt's best anchor within the block (per lane, then across lanes by value then index).
// Pass 2, per image: the gts' best anchors across blocks (first block wins ties), then the force
// matches, the lowest gt index winning an anchor claimed twice. Pass 3, parallel again:
// thresholds, class targets, box encoding, positives per block.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/isa.h"
#include "common/parallel.h"
#include "losses/losses.h"
#include "losses/vmath.h"

namespace effops::losses {
namespace {

constexpr int64_t kBlock = 256;

struct Gt {  // the valid gts of one image, structure of arrays
  std::vector<float> y1, x1, y2, x2, area;
  std::vector<int64_t> row;  // index into the image's G rows
};

// Pass 1 for one block of anchors [a0, a0 + n): best[] / arg[] per anchor (arg: compact gt
// index, -1 for none), gbest[] / gidx[] per compact gt.
template <int W>
EFFOPS_VM_INLINE void block_pass(const float* anchors, int64_t a0, int64_t n, const Gt& gt, float* best, int32_t* arg,
                                 float* gbest, int64_t* gidx) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  constexpr int L = Vec<W>::L;
  alignas(64) float sy1[kBlock], sx1[kBlock], sy2[kBlock], sx2[kBlock], sa[kBlock];
  alignas(64) float bb[kBlock];
  alignas(64) int32_t ab[kBlock];
  const int64_t np = (n + L - 1) / L * L;
  for (int64_t i = 0; i < np; ++i) {
    const float* a = anchors + 4 * (a0 + std::min(i, n - 1));
    sy1[i] = a[0], sx1[i] = a[1], sy2[i] = a[2], sx2[i] = a[3];
    sa[i] = (a[2] - a[0]) * (a[3] - a[1]);
    bb[i] = -1.0f, ab[i] = -1;
  }
  I iota;
  for (int l = 0; l < L; ++l) iota[l] = l;
  const int64_t nv = static_cast<int64_t>(gt.row.size());
  for (int64_t k = 0; k < nv; ++k) {
    const F gy1 = vsplat<F>(gt.y1[k]), gx1 = vsplat<F>(gt.x1[k]), gy2 = vsplat<F>(gt.y2[k]), gx2 = vsplat<F>(gt.x2[k]);
    const F ga = vsplat<F>(gt.area[k]);
    const I kv = I{} + static_cast<int32_t>(k);
    F lb = vsplat<F>(-1.0f);
    I li = I{} - 1;
    for (int64_t i = 0; i < np; i += L) {
      F ay1 = vload<W>(sy1 + i), ax1 = vload<W>(sx1 + i), ay2 = vload<W>(sy2 + i), ax2 = vload<W>(sx2 + i);
      F ih = vsel(gy2 < ay2, gy2, ay2) - vsel(gy1 > ay1, gy1, ay1);
      F iw = vsel(gx2 < ax2, gx2, ax2) - vsel(gx1 > ax1, gx1, ax1);
      ih = vsel(ih < 0.0f, vsplat<F>(0.0f), ih);
      iw = vsel(iw < 0.0f, vsplat<F>(0.0f), iw);
      F inter = ih * iw;
      F uni = (ga + vload<W>(sa + i)) - inter;
      F iou = vsel(inter == 0.0f, vsplat<F>(0.0f), inter / uni);
      I lane = iota + static_cast<int32_t>(i);
      iou = vsel(lane < static_cast<int32_t>(n), iou, vsplat<F>(-2.0f));
      F b = vload<W>(bb + i);
      I a;
      std::memcpy(&a, ab + i, sizeof a);
      auto up = iou > b;
      b = vsel(up, iou, b);
      a = vsel(up, kv, a);
      vstore<W>(bb + i, b);
      std::memcpy(ab + i, &a, sizeof a);
      auto gu = iou > lb;
      lb = vsel(gu, iou, lb);
      li = vsel(gu, lane, li);
    }
    float m = -1.0f;
    int32_t mi = -1;
    for (int l = 0; l < L; ++l)
      if (li[l] >= 0 && (lb[l] > m || (lb[l] == m && li[l] < mi))) m = lb[l], mi = li[l];
    gbest[k] = m;
    gidx[k] = mi < 0 ? -1 : a0 + mi;
  }
  std::memcpy(best, bb, n * sizeof(float));
  std::memcpy(arg, ab, n * sizeof(int32_t));
}

#if EFFOPS_X86
EFFOPS_TARGET_V4 void block_v4(const float* an, int64_t a0, int64_t n, const Gt& gt, float* b, int32_t* a, float* gb,
                               int64_t* gi) {
  block_pass<64>(an, a0, n, gt, b, a, gb, gi);
}
EFFOPS_TARGET_V3 void block_v3(const float* an, int64_t a0, int64_t n, const Gt& gt, float* b, int32_t* a, float* gb,
                               int64_t* gi) {
  block_pass<32>(an, a0, n, gt, b, a, gb, gi);
}
#endif
void block_base(const float* an, int64_t a0, int64_t n, const Gt& gt, float* b, int32_t* a, float* gb, int64_t* gi) {
  block_pass<16>(an, a0, n, gt, b, a, gb, gi);
}

// FasterRcnnBoxCoder.encode of box (y1 x1 y2 x2) against anchor, effdet's operation order.
inline void encode(const float* g, const float* an, float* out) {
  const float eps = 1e-7f;
  float wa = an[3] - an[1], ha = an[2] - an[0];
  const float yca = an[0] + ha / 2.0f, xca = an[1] + wa / 2.0f;
  float w = g[3] - g[1], h = g[2] - g[0];
  const float yc = g[0] + h / 2.0f, xc = g[1] + w / 2.0f;
  ha += eps, wa += eps, h += eps, w += eps;
  out[1] = (xc - xca) / wa;
  out[0] = (yc - yca) / ha;
  out[3] = std::log(w / wa);
  out[2] = std::log(h / ha);
}

}  // namespace

void match_anchors(const float* anchors, int64_t A, const float* gtb, const int64_t* labels, const uint8_t* valid,
                   int64_t B, int64_t G, float match_thr, float unmatched_thr, int64_t ignored_class, int64_t* cls,
                   float* box, float* npos, int threads) {
  if (B == 0) return;
  std::vector<Gt> gts(B);
  for (int64_t b = 0; b < B; ++b) {
    Gt& g = gts[b];
    for (int64_t j = 0; j < G; ++j) {
      if (!valid[b * G + j]) continue;
      const float* p = gtb + 4 * (b * G + j);
      g.y1.push_back(p[0]), g.x1.push_back(p[1]), g.y2.push_back(p[2]), g.x2.push_back(p[3]);
      g.area.push_back((p[2] - p[0]) * (p[3] - p[1]));
      g.row.push_back(j);
    }
  }
  const int64_t blocks = (A + kBlock - 1) / kBlock;
  std::vector<float> best(B * A);
  std::vector<int32_t> arg(B * A), forced(B * A, -1);
  std::vector<float> gbest(B * blocks * std::max<int64_t>(G, 1));
  std::vector<int64_t> gidx(B * blocks * std::max<int64_t>(G, 1));
  const Isa level = isa();
  parallel_for(B * blocks, threads, [&](int64_t task, int) {
    const int64_t b = task / blocks, blk = task % blocks;
    const int64_t a0 = blk * kBlock, n = std::min(kBlock, A - a0);
    if (gts[b].row.empty()) return;
    float* bs = best.data() + b * A + a0;
    int32_t* as = arg.data() + b * A + a0;
    float* gb = gbest.data() + task * G;
    int64_t* gi = gidx.data() + task * G;
#if EFFOPS_X86
    if (level == kV4) return block_v4(anchors, a0, n, gts[b], bs, as, gb, gi);
    if (level == kV3) return block_v3(anchors, a0, n, gts[b], bs, as, gb, gi);
#endif
    (void)level;
    block_base(anchors, a0, n, gts[b], bs, as, gb, gi);
  });
  // pass 2: each gt's best anchor over the blocks, then the force matches (lowest gt wins)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nv = static_cast<int64_t>(gts[b].row.size());
    for (int64_t k = nv - 1; k >= 0; --k) {
      float m = -1.0f;
      int64_t mi = -1;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t t = b * blocks + blk;
        if (gbest[t * G + k] > m) m = gbest[t * G + k], mi = gidx[t * G + k];
      }
      if (mi >= 0) forced[b * A + mi] = static_cast<int32_t>(k);
    }
  }
  // pass 3: thresholds, targets, positives
  std::vector<int64_t> count(B * blocks, 0);
  parallel_for(B * blocks, threads, [&](int64_t task, int) {
    const int64_t b = task / blocks, blk = task % blocks;
    const int64_t a0 = blk * kBlock, a1 = std::min(A, a0 + kBlock);
    const Gt& g = gts[b];
    const bool any = !g.row.empty();
    int64_t pos = 0;
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t i = b * A + a;
      int64_t m = -1;
      if (any) {
        if (forced[i] >= 0) m = forced[i];
        else if (best[i] < unmatched_thr) m = -1;
        else if (best[i] < match_thr) m = -2;
        else m = arg[i];
      }
      float* o = box + 4 * i;
      if (m >= 0) {
        const int64_t row = g.row[m];
        cls[i] = labels[b * G + row];
        encode(gtb + 4 * (b * G + row), anchors + 4 * a, o);
        ++pos;
      } else {
        cls[i] = m == -2 ? ignored_class : -1;
        o[0] = o[1] = o[2] = o[3] = 0.0f;
      }
    }
    count[task] = pos;
  });
  for (int64_t b = 0; b < B; ++b) {
    int64_t s = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) s += count[b * blocks + blk];
    npos[b] = static_cast<float>(s);
  }
}

}  // namespace effops::losses
