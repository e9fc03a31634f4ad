// Candidate selection of EfficientDet's post-processing (python/effops/models/detection.py): of
// the N x C class logits of one image (levels one after another), the k best (anchor, class)
// pairs under the total order (logit descending, flat index anchor * C + class ascending), i.e.
// torch.topk with equal values going to the lower index.
//
// Without materialising anything of size N x C: one pass takes each anchor's best logit; the
// ka = min(k, N) anchors with the largest best logit (same order on (logit, anchor)) hold all k
// pairs, and where ka = k every one of those pairs is >= t, the smallest of their best logits
// (each of the k anchors has one pair >= t, so the k-th pair is >= t too). So only the pairs >= t among those
// anchors are ranked. NaN logits rank as +inf (torch.topk ranks NaN largest).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common/parallel.h"
#include "nms/nms_api.h"

namespace effops::nms {
namespace {

inline float rank_key(float v) { return std::isnan(v) ? std::numeric_limits<float>::infinity() : v; }

// Best (rank_key) logit of rows [r0, r1) of a [rows, C] block.
void row_max(const float* x, int64_t C, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* p = x + r * C;
    float m = -std::numeric_limits<float>::infinity();
    bool nan = false;
    for (int64_t c = 0; c < C; ++c) {
      m = p[c] > m ? p[c] : m;
      nan |= p[c] != p[c];
    }
    out[r] = nan ? std::numeric_limits<float>::infinity() : m;
  }
}

}  // namespace

void topk_candidates_api(const std::vector<CpuArray>& levels, int64_t k, const CpuArray& top_anchor,
                         const CpuArray& pos, const CpuArray& vals, int threads) {
  const char* op = "topk_candidates";
  check(!levels.empty(), op, ": levels must not be empty");
  const int64_t B = levels[0].ndim() == 3 ? static_cast<int64_t>(levels[0].shape(0)) : -1;
  const int64_t C = levels[0].ndim() == 3 ? static_cast<int64_t>(levels[0].shape(2)) : -1;
  check(B >= 0 && C >= 1, op, ": levels must be [B, N_l, C] with C >= 1");
  int64_t N = 0;
  for (const CpuArray& l : levels) {
    check_shape(l, {B, -1, C}, op, "each level");
    check_dtype(l, nb::dtype<float>(), op, "each level");
    N += static_cast<int64_t>(l.shape(1));
  }
  const int64_t NC = checked_mul(N, C, op, "N * C");
  check(k >= 1 && k <= NC, op, ": k must be in [1, N * C] = [1, ", NC, "], got ", k);
  const int64_t ka = std::min(k, N);
  check_shape(top_anchor, {B, ka}, op, "top_anchor");
  check_shape(pos, {B, k}, op, "pos");
  check_shape(vals, {B, k}, op, "vals");
  check_dtype(top_anchor, nb::dtype<int64_t>(), op, "top_anchor");
  check_dtype(pos, nb::dtype<int64_t>(), op, "pos");
  check_dtype(vals, nb::dtype<float>(), op, "vals");

  // row pointers of image b, anchor a: level base + offset
  std::vector<int64_t> start(levels.size() + 1, 0);
  for (size_t l = 0; l < levels.size(); ++l) start[l + 1] = start[l] + static_cast<int64_t>(levels[l].shape(1));
  auto row = [&](int64_t b, int64_t a) -> const float* {
    const size_t l = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), a) - start.begin()) - 1;
    const int64_t n_l = start[l + 1] - start[l];
    return data_of<const float>(levels[l]) + (b * n_l + (a - start[l])) * C;
  };

  std::vector<float> best(static_cast<size_t>(N));
  std::vector<int64_t> order(static_cast<size_t>(N));
  for (int64_t b = 0; b < B; ++b) {
    // 1. each anchor's best logit (the one pass over all logits), chunks of rows in parallel
    const int64_t chunk = 2048;
    const int64_t tasks = (N + chunk - 1) / chunk;
    parallel_for(tasks, N * C < (int64_t(1) << 16) ? 1 : threads, [&](int64_t t, int) {
      const int64_t a0 = t * chunk, a1 = std::min(N, a0 + chunk);
      for (int64_t a = a0; a < a1;) {  // a run of rows inside one level
        const size_t l = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), a) - start.begin()) - 1;
        const int64_t end = std::min(a1, start[l + 1]);
        const int64_t n_l = start[l + 1] - start[l];
        const float* base = data_of<const float>(levels[l]) + b * n_l * C;
        row_max(base - start[l] * C, C, a, end, best.data());
        a = end;
      }
    });
    // 2. the ka best anchors, ascending
    std::iota(order.begin(), order.end(), int64_t(0));
    auto anchor_before = [&](int64_t x, int64_t y) { return best[x] > best[y] || (best[x] == best[y] && x < y); };
    if (ka < N) std::nth_element(order.begin(), order.begin() + (ka - 1), order.end(), anchor_before);
    std::sort(order.begin(), order.begin() + ka);
    // (with fewer anchors than k every pair is a candidate: the bound needs k anchors)
    float t = ka < k ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
    if (ka == k)
      for (int64_t j = 0; j < ka; ++j) t = std::min(t, best[order[j]]);
    int64_t* ta = data_of<int64_t>(top_anchor) + b * ka;
    std::copy(order.begin(), order.begin() + ka, ta);
    // 3. the pairs >= t of those anchors, ranked; positions j * C + c in the [ka * C] rows
    std::vector<std::pair<float, int64_t>> cand;
    cand.reserve(static_cast<size_t>(std::min<int64_t>(4 * k, ka * C)));
    for (int64_t j = 0; j < ka; ++j) {
      const float* p = row(b, ta[j]);
      for (int64_t c = 0; c < C; ++c) {
        const float v = rank_key(p[c]);
        if (v >= t) cand.emplace_back(v, j * C + c);
      }
    }
    auto pair_before = [](const std::pair<float, int64_t>& x, const std::pair<float, int64_t>& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    };
    if (static_cast<int64_t>(cand.size()) > k)
      std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), pair_before);
    check(static_cast<int64_t>(cand.size()) >= k, op, ": internal error: fewer candidates than k");
    std::sort(cand.begin(), cand.begin() + k, pair_before);  // best first, as torch.topk(sorted=True)
    int64_t* po = data_of<int64_t>(pos) + b * k;
    float* vo = data_of<float>(vals) + b * k;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t q = cand[static_cast<size_t>(i)].second;
      po[i] = q;
      vo[i] = row(b, ta[q / C])[q % C];
    }
  }
}

}  // namespace effops::nms
