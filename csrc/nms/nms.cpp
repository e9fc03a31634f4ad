// CPU kernels of the NMS family; semantics in nms.h.
//
// Speed comes from not comparing boxes that cannot overlap. The argument, for a threshold
// t >= 0 (the case detectors use):
//  * IoU(i, j) > t >= 0 needs inter > 0, i.e. min(x2) > max(x1) and min(y2) > max(y1), so both
//    boxes are "proper" (x2 > x1, y2 > y1). A box with a non-finite coordinate has a NaN or
//    infinite area, which makes the IoU NaN or 0. So boxes that are not proper and finite never
//    suppress and are never suppressed: they are kept without any comparison.
//  * cell(v) = clamp(floor((v - origin) / size)) maps a coordinate to a grid column; it is
//    monotone (non-decreasing) whatever the rounding. A proper box spans columns
//    [cell(x1), cell(x2)]; boxes that overlap have overlapping x intervals, hence overlapping
//    column ranges (integers, exact). Each box is filed once, under the cell of its lower-left
//    corner; with D the largest column span of the boxes of a level, a box overlapping the
//    candidate [a, b] has its lower-left column in [a - D, b]. Visiting those cells finds every
//    box that can suppress the candidate, exactly, with no box seen twice.
//  * Boxes come in all sizes, so the grid is hierarchical: level l has cells twice as large as
//    level l - 1, and a box lives on the first level whose cells are at least as large as it
//    (D is then 1 or 2). A candidate visits every level that holds kept boxes; where that would
//    mean more cells than the level has boxes, it scans the level's list instead.
//  * The IoU tests against the boxes of a cell run over contiguous arrays in branch-free blocks
//    of 8, so they vectorize; cells are padded to whole blocks with sentinel boxes of NaN area
//    (NaN IoU: never over any threshold). The loop is compiled for AVX2 and for the baseline,
//    picked at run time (target_clones), never with -march flags.
// For t < 0 (or tiny inputs) every pair can interact and a linear scan over the kept boxes is
// used; it is the textbook greedy loop and exact by definition.
#include "nms/nms.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <queue>
#include <vector>

#include "common/errors.h"
#include "common/parallel.h"
#include "common/sort.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define EFFOPS_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define EFFOPS_SIMD_CLONES
#endif
#if defined(__GNUC__) || defined(__clang__)
#define EFFOPS_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define EFFOPS_ALWAYS_INLINE inline
#endif

namespace effops::nms {
namespace {

// ------------------------------------------------------------------------ thresholds
// For a float v and a double t: v > t  <=>  v > f, with f the largest float <= t. Comparing
// in float keeps the vector loops in one type and equals torchvision's CPU comparison.
float largest_float_at_most(double t) {
  if (std::isnan(t)) return std::numeric_limits<float>::quiet_NaN();
  constexpr double fmax = std::numeric_limits<float>::max();
  if (t >= fmax) return t == std::numeric_limits<double>::infinity()
                            ? std::numeric_limits<float>::infinity()
                            : std::numeric_limits<float>::max();
  if (t < -fmax) return -std::numeric_limits<float>::infinity();
  float f = static_cast<float>(t);
  if (static_cast<double>(f) > t) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}
template <class T>
T compare_threshold(double t);
template <>
float compare_threshold<float>(double t) {
  return largest_float_at_most(t);
}
template <>
double compare_threshold<double>(double t) {
  return t;
}

// ------------------------------------------------------------------------ IoU
// Same operations in the same order as torchvision's CPU kernel (std::max/std::min semantics).
template <class T>
EFFOPS_ALWAYS_INLINE T iou(T ax1, T ay1, T ax2, T ay2, T aa, T bx1, T by1, T bx2, T by2, T ba) {
  T xx1 = ax1 < bx1 ? bx1 : ax1;
  T yy1 = ay1 < by1 ? by1 : ay1;
  T xx2 = bx2 < ax2 ? bx2 : ax2;
  T yy2 = by2 < ay2 ? by2 : ay2;
  T w = xx2 - xx1;
  T h = yy2 - yy1;
  w = T(0) < w ? w : T(0);
  h = T(0) < h ? h : T(0);
  T inter = w * h;
  return inter / (aa + ba - inter);
}

// Vector block: 8 lanes (one AVX2 register of floats, two of doubles).
constexpr int64_t kBlock = 8;
inline int64_t round_block(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// Boxes as structure of arrays. Slots not holding a box are sentinels with NaN area.
template <class T>
struct Soa {
  std::vector<T> x1, y1, x2, y2, ar;
  void reset(int64_t n) {  // n slots, all sentinels
    size_t m = static_cast<size_t>(n);
    x1.assign(m, T(0)), y1.assign(m, T(0)), x2.assign(m, T(0)), y2.assign(m, T(0));
    ar.assign(m, std::numeric_limits<T>::quiet_NaN());
  }
  void set(int64_t k, T a, T b, T c, T d, T e) {
    x1[k] = a, y1[k] = b, x2[k] = c, y2[k] = d, ar[k] = e;
  }
};

struct Box4 {
  double x1, y1, x2, y2;
};

// Does any of the boxes [off, off + round_block(n)) have IoU > thr with box b? Branch-free
// blocks so they vectorize, an early exit between blocks; slots past n must be sentinels.
template <class T>
EFFOPS_ALWAYS_INLINE bool any_over(const Soa<T>& s, int64_t off, int64_t n, T bx1, T by1, T bx2,
                                   T by2, T ba, T thr) {
  const T* __restrict x1 = s.x1.data() + off;
  const T* __restrict y1 = s.y1.data() + off;
  const T* __restrict x2 = s.x2.data() + off;
  const T* __restrict y2 = s.y2.data() + off;
  const T* __restrict ar = s.ar.data() + off;
  for (int64_t k = 0; k < n; k += kBlock) {
    int hit = 0;
    for (int64_t u = 0; u < kBlock; ++u)
      hit |= iou(bx1, by1, bx2, by2, ba, x1[k + u], y1[k + u], x2[k + u], y2[k + u], ar[k + u]) >
             thr;
    if (hit) return true;
  }
  return false;
}

template <class T>
inline bool proper(T x1, T y1, T x2, T y2) {
  return std::isfinite(x1) && std::isfinite(y1) && std::isfinite(x2) && std::isfinite(y2) &&
         x2 > x1 && y2 > y1;
}

// ------------------------------------------------------------------------ the grid
constexpr int kMaxLevels = 40;
// A candidate scans a level's whole list instead of its cells when it would visit more than
// (level size / kCellCost) cells: a cell visit costs about as much as kCellCost IoU tests.
constexpr int64_t kCellCost = 8;
// Segments smaller than this use the linear scan; building a grid does not pay off.
constexpr int64_t kGridMin = 64;
// Inputs smaller than this run on one thread (waking workers costs more than they save).
constexpr int64_t kParallelMin = 20000;

// Geometry of a hierarchical grid over the proper boxes of one segment; see the file comment.
// Capacities (cells and level lists) are those of all proper boxes, rounded to whole blocks.
template <class T>
struct Grid {
  int L = 0;
  int64_t nproper = 0;
  double ox = 0, oy = 0;
  double inv[kMaxLevels];
  int64_t G[kMaxLevels];     // cells per side
  int64_t base[kMaxLevels];  // first cell of the level
  int64_t D[kMaxLevels];     // largest column/row span of the level's boxes
  int64_t total = 0;
  std::vector<int8_t> lvl;  // level of each box, -1 when it is not proper
  std::vector<int32_t> cx, cy;  // lower-left cell of each box
  std::vector<int64_t> start;   // slot offsets of the cells
  std::vector<int64_t> lstart;  // slot offsets of the levels' lists
  std::vector<int64_t> count_, lcount_;

  int64_t cell(double v, double o, int l) const {
    double c = std::floor((v - o) * inv[l]);
    int64_t g = G[l] - 1;
    if (!(c > 0)) return 0;
    return c >= static_cast<double>(g) ? g : static_cast<int64_t>(c);
  }
  int64_t index(int l, int64_t x, int64_t y) const { return base[l] + y * G[l] + x; }

  // Returns false when the proper boxes span a range too large for doubles (linear fallback).
  bool build(const Soa<T>& b, int64_t off, int64_t n) {
    lvl.assign(static_cast<size_t>(n), -1);
    nproper = 0;
    double minx = INFINITY, miny = INFINITY, maxx = -INFINITY, maxy = -INFINITY;
    double min_md = INFINITY, max_md = 0;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t q = off + p;
      if (!proper(b.x1[q], b.y1[q], b.x2[q], b.y2[q])) continue;
      lvl[p] = 0;
      ++nproper;
      double x1 = b.x1[q], y1 = b.y1[q], x2 = b.x2[q], y2 = b.y2[q];
      minx = std::min(minx, x1), miny = std::min(miny, y1);
      maxx = std::max(maxx, x2), maxy = std::max(maxy, y2);
      double md = std::max(x2 - x1, y2 - y1);
      min_md = std::min(min_md, md), max_md = std::max(max_md, md);
    }
    L = 0;
    if (nproper == 0) {  // an empty grid, but a valid one: callers index start[total], lstart[L]
      total = 0;
      start.assign(1, 0);
      lstart.assign(1, 0);
      return true;
    }
    double range = std::max(maxx - minx, maxy - miny);
    if (!std::isfinite(range) || !std::isfinite(max_md) || !(range > 0)) return false;
    ox = minx, oy = miny;
    // The top level's cells fit the largest box; each level below halves them, down to the
    // smallest box or to ~2 * nproper cells a level (finer cells cost more than they save).
    const double floor_cs = std::max(min_md, range / std::sqrt(2.0 * static_cast<double>(nproper)));
    double cs[kMaxLevels];
    int levels = 1;
    double top = max_md;
    while (levels < kMaxLevels && top * 0.5 >= floor_cs) top *= 0.5, ++levels;
    L = levels;
    for (int l = 0; l < L; ++l) cs[l] = std::ldexp(top, l);
    cs[L - 1] = std::max(cs[L - 1], max_md);
    total = 0;
    for (int l = 0; l < L; ++l) {
      inv[l] = 1.0 / cs[l];
      G[l] = static_cast<int64_t>(std::min(std::floor(range * inv[l]), 65535.0)) + 1;
      base[l] = total;
      D[l] = 0;
      total += G[l] * G[l];
    }
    cx.resize(n), cy.resize(n);
    std::vector<int64_t>& count = count_;
    std::vector<int64_t>& lcount = lcount_;
    count.assign(static_cast<size_t>(total), 0);
    lcount.assign(static_cast<size_t>(L), 0);
    for (int64_t p = 0; p < n; ++p) {
      if (lvl[p] < 0) continue;
      const int64_t q = off + p;
      double x1 = b.x1[q], y1 = b.y1[q], x2 = b.x2[q], y2 = b.y2[q];
      double md = std::max(x2 - x1, y2 - y1);
      int l = 0;
      while (l < L - 1 && cs[l] < md) ++l;
      lvl[p] = static_cast<int8_t>(l);
      int64_t a = cell(x1, ox, l), c = cell(y1, oy, l);
      cx[p] = static_cast<int32_t>(a), cy[p] = static_cast<int32_t>(c);
      D[l] = std::max({D[l], cell(x2, ox, l) - a, cell(y2, oy, l) - c});
      ++count[index(l, a, c)];
      ++lcount[l];
    }
    start.resize(static_cast<size_t>(total + 1));
    start[0] = 0;
    for (int64_t c = 0; c < total; ++c) start[c + 1] = start[c] + round_block(count[c]);
    lstart.resize(static_cast<size_t>(L + 1));
    lstart[0] = 0;
    for (int l = 0; l < L; ++l) lstart[l + 1] = lstart[l] + round_block(lcount[l]);
    return true;
  }

  // Calls visit(slot_offset, count) for each run of slots that may hold a box overlapping box
  // (x1, y1, x2, y2); visit returns true to stop (then query returns true). used_cell[c] and
  // used_level[l] say how many slots are filled; a negative offset -1 - l names level l's list.
  template <class Visit>
  EFFOPS_ALWAYS_INLINE bool query(double x1, double y1, double x2, double y2,
                                  const int32_t* used_cell, const int64_t* used_level,
                                  Visit&& visit) const {
    for (int l = 0; l < L; ++l) {
      const int64_t nl = used_level[l];
      if (nl == 0) continue;
      const int64_t qx0 = std::max<int64_t>(0, cell(x1, ox, l) - D[l]), qx1 = cell(x2, ox, l);
      const int64_t qy0 = std::max<int64_t>(0, cell(y1, oy, l) - D[l]), qy1 = cell(y2, oy, l);
      if ((qx1 - qx0 + 1) * (qy1 - qy0 + 1) * kCellCost >= nl) {
        if (visit(-1 - l, nl)) return true;
        continue;
      }
      for (int64_t y = qy0; y <= qy1; ++y) {
        const int64_t row = base[l] + y * G[l];
        for (int64_t x = qx0; x <= qx1; ++x) {
          const int32_t f = used_cell[row + x];
          if (f && visit(start[row + x], f)) return true;
        }
      }
    }
    return false;
  }
};

// ------------------------------------------------------------------------ greedy NMS
// Workspace for greedy NMS over segments of boxes given in greedy order (SoA); reusable.
template <class T>
struct Greedy {
  Grid<T> grid;
  Soa<T> kept, slots, lists;
  std::vector<int32_t> used_cell;
  int64_t used_level[kMaxLevels];
};

// The textbook loop: each box against every kept box (exact for any threshold).
template <class T>
EFFOPS_ALWAYS_INLINE int64_t greedy_linear_body(Greedy<T>& ws, const Soa<T>& b, int64_t off,
                                                int64_t n, T thr, uint8_t* keep) {
  ws.kept.reset(round_block(n));
  int64_t k = 0;
  for (int64_t p = 0; p < n; ++p) {
    const int64_t q = off + p;
    const T bx1 = b.x1[q], by1 = b.y1[q], bx2 = b.x2[q], by2 = b.y2[q], ba = b.ar[q];
    const bool sup = any_over(ws.kept, 0, k, bx1, by1, bx2, by2, ba, thr);
    keep[p] = !sup;
    if (!sup) ws.kept.set(k++, bx1, by1, bx2, by2, ba);
  }
  return k;
}

// Grid-accelerated loop for thresholds >= 0 (ws.grid already built for this segment).
template <class T>
EFFOPS_ALWAYS_INLINE int64_t greedy_grid_body(Greedy<T>& ws, const Soa<T>& b, int64_t off,
                                              int64_t n, T thr, uint8_t* keep) {
  const Grid<T>& g = ws.grid;
  ws.used_cell.assign(static_cast<size_t>(g.total), 0);
  std::fill(ws.used_level, ws.used_level + kMaxLevels, 0);
  ws.slots.reset(g.start[g.total]);
  ws.lists.reset(g.lstart[g.L]);
  int64_t k = 0;
  for (int64_t p = 0; p < n; ++p) {
    const int l = g.lvl[p];
    if (l < 0) {  // not proper: cannot interact with anything at a threshold >= 0
      keep[p] = 1;
      ++k;
      continue;
    }
    const int64_t q = off + p;
    const T bx1 = b.x1[q], by1 = b.y1[q], bx2 = b.x2[q], by2 = b.y2[q], ba = b.ar[q];
    const bool sup = g.query(bx1, by1, bx2, by2, ws.used_cell.data(), ws.used_level,
                             [&](int64_t s, int64_t cnt) {
                               if (s < 0)
                                 return any_over(ws.lists, g.lstart[-1 - s], cnt, bx1, by1, bx2,
                                                 by2, ba, thr);
                               return any_over(ws.slots, s, cnt, bx1, by1, bx2, by2, ba, thr);
                             });
    keep[p] = !sup;
    if (sup) continue;
    ++k;
    ws.lists.set(g.lstart[l] + ws.used_level[l]++, bx1, by1, bx2, by2, ba);
    const int64_t ci = g.index(l, g.cx[p], g.cy[p]);
    ws.slots.set(g.start[ci] + ws.used_cell[ci]++, bx1, by1, bx2, by2, ba);
  }
  return k;
}

EFFOPS_SIMD_CLONES int64_t greedy_linear(Greedy<float>& ws, const Soa<float>& b, int64_t off,
                                         int64_t n, float thr, uint8_t* keep) {
  return greedy_linear_body(ws, b, off, n, thr, keep);
}
EFFOPS_SIMD_CLONES int64_t greedy_linear(Greedy<double>& ws, const Soa<double>& b, int64_t off,
                                         int64_t n, double thr, uint8_t* keep) {
  return greedy_linear_body(ws, b, off, n, thr, keep);
}
EFFOPS_SIMD_CLONES int64_t greedy_grid(Greedy<float>& ws, const Soa<float>& b, int64_t off,
                                       int64_t n, float thr, uint8_t* keep) {
  return greedy_grid_body(ws, b, off, n, thr, keep);
}
EFFOPS_SIMD_CLONES int64_t greedy_grid(Greedy<double>& ws, const Soa<double>& b, int64_t off,
                                       int64_t n, double thr, uint8_t* keep) {
  return greedy_grid_body(ws, b, off, n, thr, keep);
}

// Greedy NMS over boxes [off, off + n) of b (greedy order); keep[0..n) gets the decisions.
template <class T>
int64_t greedy(Greedy<T>& ws, const Soa<T>& b, int64_t off, int64_t n, double thr_d,
               uint8_t* keep) {
  if (n <= 0) return 0;
  if (std::isnan(thr_d)) {  // nothing is greater than NaN: every box stays
    std::fill(keep, keep + n, uint8_t(1));
    return n;
  }
  const T thr = compare_threshold<T>(thr_d);
  if (thr_d >= 0 && n >= kGridMin && ws.grid.build(b, off, n))
    return greedy_grid(ws, b, off, n, thr, keep);
  return greedy_linear(ws, b, off, n, thr, keep);
}

// Per-thread workspaces, kept between calls: no allocation (or page fault) per call once warm.
template <class T>
Greedy<T>& local_greedy() {
  thread_local Greedy<T> ws;
  return ws;
}

// Gathers boxes[idx[p]] (row-major xyxy, stride 4) into the SoA at offset off, with areas
// computed as torchvision does: (x2 - x1) * (y2 - y1) in T.
template <class T>
void gather_boxes(const T* boxes, const int64_t* idx, int64_t n, Soa<T>& out, int64_t off) {
  for (int64_t p = 0; p < n; ++p) {
    const T* r = boxes + 4 * idx[p];
    out.set(off + p, r[0], r[1], r[2], r[3], (r[2] - r[0]) * (r[3] - r[1]));
  }
}

template <class T>
using KeyOf = decltype(desc_key(T()));

// order[0..n) = indices sorted by score (descending, NaN first, stable).
template <class T>
void score_order(const T* scores, int64_t n, int64_t* order) {
  using K = KeyOf<T>;
  thread_local std::vector<K> keys, kbuf;
  thread_local std::vector<int64_t> pbuf;
  keys.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) keys[i] = desc_key(scores[i]);
  stable_argsort(keys.data(), n, order, kbuf, pbuf);
}

// Splits the score order into per-class segments: seg_order lists indices grouped by class
// (score order kept inside each group), seg_bounds the group boundaries.
void class_segments(const int64_t* idxs, const int64_t* order, int64_t n,
                    std::vector<int64_t>& seg_order, std::vector<int64_t>& seg_bounds) {
  std::vector<uint64_t> keys(static_cast<size_t>(n)), kbuf;
  std::vector<int64_t> perm(static_cast<size_t>(n)), pbuf;
  for (int64_t p = 0; p < n; ++p) keys[p] = asc_key(idxs[order[p]]);
  stable_argsort(keys.data(), n, perm.data(), kbuf, pbuf);
  seg_order.resize(static_cast<size_t>(n));
  seg_bounds.assign(1, 0);
  for (int64_t p = 0; p < n; ++p) {
    seg_order[p] = order[perm[p]];
    if (p > 0 && keys[perm[p]] != keys[perm[p - 1]]) seg_bounds.push_back(p);
  }
  seg_bounds.push_back(n);
}

// ------------------------------------------------------------------------ static grid
// All proper boxes of a segment filed once; used by soft-NMS and Matrix NMS, which need the
// neighbours of a box rather than a growing kept set. Each box is reported at most once.
template <class T>
struct Neighbours {
  Grid<T> grid;
  bool ok = false;
  std::vector<int64_t> slots, lists, proper_list;
  std::vector<int32_t> used_cell;
  int64_t used_level[kMaxLevels];

  void build(const Soa<T>& b, int64_t n) {
    ok = grid.build(b, 0, n);
    proper_list.clear();
    if (!ok) {  // no usable geometry: every proper box is a potential neighbour
      for (int64_t p = 0; p < n; ++p)
        if (proper(b.x1[p], b.y1[p], b.x2[p], b.y2[p])) proper_list.push_back(p);
      return;
    }
    used_cell.assign(static_cast<size_t>(grid.total), 0);
    std::fill(used_level, used_level + kMaxLevels, 0);
    slots.assign(static_cast<size_t>(grid.start[grid.total]), -1);
    lists.assign(static_cast<size_t>(grid.lstart[grid.L]), -1);
    for (int64_t p = 0; p < n; ++p) {
      const int l = grid.lvl[p];
      if (l < 0) continue;
      lists[grid.lstart[l] + used_level[l]++] = p;
      const int64_t ci = grid.index(l, grid.cx[p], grid.cy[p]);
      slots[grid.start[ci] + used_cell[ci]++] = p;
    }
  }
  // visit(q) for every proper box q that may overlap proper box p (p itself included).
  template <class Visit>
  void each(const Soa<T>& b, int64_t p, Visit&& visit) const {
    if (!ok) {
      for (int64_t q : proper_list) visit(q);
      return;
    }
    grid.query(b.x1[p], b.y1[p], b.x2[p], b.y2[p], used_cell.data(), used_level,
               [&](int64_t s, int64_t cnt) {
                 const int64_t* src = s < 0 ? lists.data() + grid.lstart[-1 - s] : slots.data() + s;
                 for (int64_t k = 0; k < cnt; ++k) visit(src[k]);
                 return false;
               });
  }
};

template <class T>
inline T iou_at(const Soa<T>& b, int64_t p, int64_t q) {
  return iou(b.x1[p], b.y1[p], b.x2[p], b.y2[p], b.ar[p], b.x1[q], b.y1[q], b.x2[q], b.y2[q],
             b.ar[q]);
}

}  // namespace

// ------------------------------------------------------------------------ entry points
template <class T>
int64_t nms(const T* boxes, const T* scores, int64_t n, double thr, int64_t* keep_out,
            int /*threads*/) {
  if (n <= 0) return 0;
  thread_local std::vector<int64_t> order;
  thread_local std::vector<uint8_t> keep;
  thread_local Soa<T> b;
  order.resize(static_cast<size_t>(n));
  keep.resize(static_cast<size_t>(n));
  score_order(scores, n, order.data());
  b.reset(n);
  gather_boxes(boxes, order.data(), n, b, 0);
  greedy(local_greedy<T>(), b, 0, n, thr, keep.data());
  int64_t k = 0;
  for (int64_t p = 0; p < n; ++p)
    if (keep[p]) keep_out[k++] = order[p];
  return k;
}

template <class T>
int64_t batched_nms(const T* boxes, const T* scores, const int64_t* idxs, int64_t n, double thr,
                    int64_t* keep_out, int threads) {
  if (n <= 0) return 0;
  std::vector<int64_t> order(static_cast<size_t>(n)), seg_order, bounds;
  score_order(scores, n, order.data());
  class_segments(idxs, order.data(), n, seg_order, bounds);
  Soa<T> b;
  b.reset(n);
  gather_boxes(boxes, seg_order.data(), n, b, 0);
  std::vector<uint8_t> keep_seg(static_cast<size_t>(n)), keep(static_cast<size_t>(n));
  const int64_t nseg = static_cast<int64_t>(bounds.size()) - 1;
  // Threads only pay off for large inputs: small per-class segments finish faster than a worker
  // wakes up.
  parallel_for(nseg, n >= kParallelMin ? threads : 1, [&](int64_t s, int) {
    greedy(local_greedy<T>(), b, bounds[s], bounds[s + 1] - bounds[s], thr,
           keep_seg.data() + bounds[s]);
  });
  for (int64_t p = 0; p < n; ++p) keep[seg_order[p]] = keep_seg[p];
  int64_t k = 0;
  for (int64_t p = 0; p < n; ++p)
    if (keep[order[p]]) keep_out[k++] = order[p];
  return k;
}

template <class T>
void multiclass_nms(const T* boxes, bool per_class_boxes, const T* scores, int64_t B, int64_t N,
                    int64_t C, double thr, double score_thr, int64_t pre_k, int64_t M,
                    bool agnostic, int64_t* num_out, T* boxes_out, T* scores_out,
                    int64_t* classes_out, int64_t* indices_out, int threads) {
  using K = KeyOf<T>;
  struct Image {
    std::vector<int64_t> ord;     // candidate flat indices (n*C + c) in score order
    std::vector<int64_t> bounds;  // segment bounds into seg (class groups)
    std::vector<int64_t> seg;     // positions into ord, grouped by class
    Soa<T> b;                     // boxes in seg order
    std::vector<uint8_t> keep;    // per seg position
  };
  std::vector<Image> img(static_cast<size_t>(B));
  // Phase 1 (per image): candidates, their score order, class segments, boxes.
  parallel_for(B, threads, [&](int64_t bi, int) {
    Image& im = img[bi];
    const T* s = scores + bi * N * C;
    const int64_t nc_all = N * C;
    if (pre_k >= 0) {
      // Radix select: histogram the top 16 bits of the sort keys of the candidates, find the
      // bucket holding the k-th best, collect everything up to that bucket, sort, cut at k.
      constexpr int kShift = static_cast<int>(sizeof(K) * 8) - 16;
      thread_local std::vector<int64_t> hist;
      hist.assign(65536, 0);
      int64_t nc = 0;
      for (int64_t f = 0; f < nc_all; ++f)
        if (static_cast<double>(s[f]) > score_thr) ++hist[desc_key(s[f]) >> kShift], ++nc;
      uint64_t last = 65535;
      if (nc > pre_k) {
        int64_t cum = 0;
        for (last = 0; last < 65536; ++last)
          if ((cum += hist[last]) >= pre_k) break;
      }
      std::vector<std::pair<K, int64_t>> sel;
      sel.reserve(static_cast<size_t>(nc - pre_k > 1024 ? pre_k + 1024 : nc));  // no pre_k + 1024 overflow
      for (int64_t f = 0; f < nc_all; ++f) {
        if (!(static_cast<double>(s[f]) > score_thr)) continue;
        K key = desc_key(s[f]);
        if ((key >> kShift) <= last) sel.emplace_back(key, f);
      }
      const int64_t keep_n = std::min<int64_t>(pre_k, static_cast<int64_t>(sel.size()));
      std::partial_sort(sel.begin(), sel.begin() + keep_n, sel.end());
      im.ord.resize(static_cast<size_t>(keep_n));
      for (int64_t i = 0; i < keep_n; ++i) im.ord[i] = sel[i].second;
    } else {
      std::vector<int64_t> cand;
      std::vector<K> keys;
      for (int64_t f = 0; f < nc_all; ++f)
        if (static_cast<double>(s[f]) > score_thr) cand.push_back(f), keys.push_back(desc_key(s[f]));
      const int64_t nc = static_cast<int64_t>(cand.size());
      std::vector<K> kbuf;
      std::vector<int64_t> perm(static_cast<size_t>(nc)), pbuf;
      stable_argsort(keys.data(), nc, perm.data(), kbuf, pbuf);
      im.ord.resize(static_cast<size_t>(nc));
      for (int64_t i = 0; i < nc; ++i) im.ord[i] = cand[perm[i]];
    }
    const int64_t k = static_cast<int64_t>(im.ord.size());
    im.seg.resize(static_cast<size_t>(k));
    if (agnostic) {
      for (int64_t i = 0; i < k; ++i) im.seg[i] = i;
      im.bounds = {0, k};
    } else {  // counting sort by class, stable
      std::vector<int64_t> cnt(static_cast<size_t>(C + 1), 0);
      for (int64_t i = 0; i < k; ++i) ++cnt[im.ord[i] % C + 1];
      for (int64_t c = 0; c < C; ++c) cnt[c + 1] += cnt[c];
      im.bounds.assign(1, 0);
      for (int64_t c = 0; c < C; ++c)
        if (cnt[c + 1] > cnt[c]) im.bounds.push_back(cnt[c + 1]);
      for (int64_t i = 0; i < k; ++i) im.seg[cnt[im.ord[i] % C]++] = i;
    }
    im.b.reset(k);
    for (int64_t p = 0; p < k; ++p) {
      int64_t f = im.ord[im.seg[p]];
      int64_t a = f / C, c = f % C;
      const T* r = per_class_boxes ? boxes + ((bi * N + a) * C + c) * 4 : boxes + (bi * N + a) * 4;
      im.b.set(p, r[0], r[1], r[2], r[3], (r[2] - r[0]) * (r[3] - r[1]));
    }
    im.keep.assign(static_cast<size_t>(k), 0);
  });
  // Phase 2: every (image, class) segment is an independent task.
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t bi = 0; bi < B; ++bi)
    for (size_t s = 0; s + 1 < img[bi].bounds.size(); ++s) tasks.emplace_back(bi, s);
  const int64_t nt = static_cast<int64_t>(tasks.size());
  int64_t total = 0;
  for (const Image& im : img) total += static_cast<int64_t>(im.ord.size());
  parallel_for(nt, total >= kParallelMin ? threads : 1, [&](int64_t t, int) {
    Image& im = img[tasks[t].first];
    int64_t a = im.bounds[tasks[t].second], e = im.bounds[tasks[t].second + 1];
    greedy(local_greedy<T>(), im.b, a, e - a, thr, im.keep.data() + a);
  });
  // Phase 3 (per image): detections in score order, padded to M.
  parallel_for(B, threads, [&](int64_t bi, int) {
    Image& im = img[bi];
    const int64_t k = static_cast<int64_t>(im.ord.size());
    std::vector<uint8_t> kept(static_cast<size_t>(k));
    std::vector<int64_t> where(static_cast<size_t>(k));
    for (int64_t p = 0; p < k; ++p) kept[im.seg[p]] = im.keep[p], where[im.seg[p]] = p;
    const T* s = scores + bi * N * C;
    int64_t m = 0;
    for (int64_t i = 0; i < k && m < M; ++i) {
      if (!kept[i]) continue;
      int64_t f = im.ord[i], p = where[i], o = bi * M + m;
      boxes_out[4 * o + 0] = im.b.x1[p], boxes_out[4 * o + 1] = im.b.y1[p];
      boxes_out[4 * o + 2] = im.b.x2[p], boxes_out[4 * o + 3] = im.b.y2[p];
      scores_out[o] = s[f];
      classes_out[o] = f % C;
      indices_out[o] = f / C;
      ++m;
    }
    num_out[bi] = m;
    for (int64_t j = m; j < M; ++j) {
      int64_t o = bi * M + j;
      for (int d = 0; d < 4; ++d) boxes_out[4 * o + d] = T(0);
      scores_out[o] = T(0);
      classes_out[o] = -1;
      indices_out[o] = -1;
    }
  });
}

template <class T>
int64_t soft_nms(const T* boxes, const T* scores, int64_t n, double thr_d, double sigma,
                 int method, double score_thr, int64_t* keep_out, T* scores_out,
                 int /*threads*/) {
  if (n <= 0) return 0;
  for (int64_t i = 0; i < n; ++i) check(!std::isnan(scores[i]), "soft_nms: scores[", i, "] is NaN");
  std::vector<int64_t> ident(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ident[i] = i;
  Soa<T> b;
  b.reset(n);
  gather_boxes(boxes, ident.data(), n, b, 0);
  Neighbours<T> nb;
  nb.build(b, n);
  const T thr = compare_threshold<T>(thr_d);
  std::vector<T> cur(scores, scores + n);
  std::vector<uint8_t> alive(static_cast<size_t>(n), 1);
  struct Entry {
    T s;
    int64_t i;
  };
  // Max-heap on score, then lower index first. Scores only decrease, so entries whose score is
  // no longer current are stale and skipped when popped.
  auto lower = [](const Entry& a, const Entry& c) { return a.s < c.s || (a.s == c.s && a.i > c.i); };
  std::priority_queue<Entry, std::vector<Entry>, decltype(lower)> heap(lower);
  for (int64_t i = 0; i < n; ++i)
    if (!(static_cast<double>(cur[i]) < score_thr)) heap.push({cur[i], i});
  int64_t k = 0;
  while (!heap.empty()) {
    Entry e = heap.top();
    heap.pop();
    if (!alive[e.i] || e.s != cur[e.i]) continue;
    if (static_cast<double>(e.s) < score_thr) break;  // the best remaining is below: all are
    alive[e.i] = 0;
    keep_out[k] = e.i;
    scores_out[k] = e.s;
    ++k;
    if (!proper(b.x1[e.i], b.y1[e.i], b.x2[e.i], b.y2[e.i])) continue;
    nb.each(b, e.i, [&](int64_t q) {
      if (!alive[q]) return;
      T v = iou_at(b, e.i, q);
      double w;
      if (method == 0) {
        if (!(v > thr)) return;
        w = 1.0 - static_cast<double>(v);
      } else {
        if (!(v > T(0))) return;  // exp(-0) = 1; NaN IoU is treated as no overlap
        w = std::exp(-(static_cast<double>(v) * v) / sigma);
      }
      cur[q] = static_cast<T>(static_cast<double>(cur[q]) * w);
      if (static_cast<double>(cur[q]) < score_thr)
        alive[q] = 0;
      else
        heap.push({cur[q], q});
    });
  }
  return k;
}

template <class T>
void matrix_nms(const T* boxes, const T* scores, const int64_t* idxs, int64_t n, int kernel,
                double sigma, T* out, int threads) {
  if (n <= 0) return;
  for (int64_t i = 0; i < n; ++i) check(!std::isnan(scores[i]), "matrix_nms: scores[", i, "] is NaN");
  std::vector<int64_t> order(static_cast<size_t>(n)), seg_order, bounds;
  score_order(scores, n, order.data());
  if (idxs) {
    class_segments(idxs, order.data(), n, seg_order, bounds);
  } else {
    seg_order = order;
    bounds = {0, n};
  }
  const int64_t nseg = static_cast<int64_t>(bounds.size()) - 1;
  // f(x) ratio of SOLOv2: f(iou) / f(cmax), as exp(-sigma (iou^2 - cmax^2)) or (1-iou)/(1-cmax).
  auto ratio = [&](double v, double cm) {
    if (kernel == 1) return std::exp(-sigma * (v * v - cm * cm));
    double den = 1.0 - cm;
    return den > 0 ? (1.0 - v) / den : INFINITY;  // f(cmax) = 0: no constraint
  };
  auto one_segment = [&](int64_t s, int inner_threads) {
    const int64_t a = bounds[s], m = bounds[s + 1] - a;
    Soa<T> b;
    b.reset(m);
    gather_boxes(boxes, seg_order.data() + a, m, b, 0);
    Neighbours<T> nb;
    nb.build(b, m);
    std::vector<double> cmax(static_cast<size_t>(m), 0.0);
    const int64_t chunk = 256, nchunks = (m + chunk - 1) / chunk;
    auto each_pos = [&](auto&& fn) {
      parallel_for(nchunks, inner_threads, [&](int64_t c, int) {
        for (int64_t p = c * chunk; p < std::min(m, (c + 1) * chunk); ++p) fn(p);
      });
    };
    each_pos([&](int64_t p) {  // cmax_p = max IoU with a higher-scored box
      if (!proper(b.x1[p], b.y1[p], b.x2[p], b.y2[p])) return;
      double best = 0;
      nb.each(b, p, [&](int64_t q) {
        if (q < p) {
          double v = iou_at(b, q, p);
          if (v > best) best = v;
        }
      });
      cmax[p] = best;
    });
    each_pos([&](int64_t p) {
      const int64_t i = seg_order[a + p];
      double decay = 1.0;
      if (proper(b.x1[p], b.y1[p], b.x2[p], b.y2[p]))
        nb.each(b, p, [&](int64_t q) {
          if (q >= p) return;
          double v = iou_at(b, q, p);
          if (v > 0) decay = std::min(decay, ratio(v, cmax[q]));
        });
      out[i] = static_cast<T>(static_cast<double>(scores[i]) * decay);
    });
  };
  if (nseg >= threads) {  // many classes: one task per class
    parallel_for(nseg, threads, [&](int64_t s, int) { one_segment(s, 1); });
  } else {
    for (int64_t s = 0; s < nseg; ++s) one_segment(s, threads);
  }
}

#define EFFOPS_NMS_INSTANTIATE(T)                                                               \
  template int64_t nms<T>(const T*, const T*, int64_t, double, int64_t*, int);                  \
  template int64_t batched_nms<T>(const T*, const T*, const int64_t*, int64_t, double, int64_t*, \
                                  int);                                                         \
  template void multiclass_nms<T>(const T*, bool, const T*, int64_t, int64_t, int64_t, double,  \
                                  double, int64_t, int64_t, bool, int64_t*, T*, T*, int64_t*,   \
                                  int64_t*, int);                                               \
  template int64_t soft_nms<T>(const T*, const T*, int64_t, double, double, int, double,        \
                               int64_t*, T*, int);                                              \
  template void matrix_nms<T>(const T*, const T*, const int64_t*, int64_t, int, double, T*, int);
EFFOPS_NMS_INSTANTIATE(float)
EFFOPS_NMS_INSTANTIATE(double)

}  // namespace effops::nms
