// Sigmoid focal loss, forward and gradient in one pass (formulas: ops/_losses_ref.py).
//
// Rows are split into tasks of ~64k elements (deterministic partial sums, one per task, added
// in task order by the caller); a task walks its rows in chunks of ~2k elements: class-index
// targets and row/element ignore masks are expanded into a per-worker float buffer of t and w
// (zeros plus one store per row: the one-hot never exists in memory), then one vector loop over
// the chunk's elements computes loss and gradient, each level (AVX-512 / AVX2 / baseline) at
// its native width, the last partial vector with the one-lane form of the same code.
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/isa.h"
#include "common/memory.h"
#include "common/parallel.h"
#include "losses/losses.h"
#include "losses/vmath.h"

namespace effops::losses {
namespace {

constexpr int64_t kTaskElems = 1 << 16;
constexpr int64_t kChunkElems = 2048;

// Loss and gradient of one vector of elements. BINARY: every t is 0 or 1 (class targets).
template <int W, bool BINARY>
EFFOPS_VM_INLINE void focal_vec(typename Vec<W>::F x, typename Vec<W>::F t, typename Vec<W>::F w,
                                const FocalArgs& a, typename Vec<W>::F& loss, typename Vec<W>::F& grad) {
  using F = typename Vec<W>::F;
  const F zero = vsplat<F>(0.0f);
  F ax = vsel(x < 0.0f, -x, x);
  F e = vexp<W>(-ax);
  F s = 1.0f / (1.0f + e);
  F es = e * s;
  auto pos = x >= 0.0f;
  F p = vsel(pos, s, es);
  F om = vsel(pos, es, s);
  F l1p = vlog1p01<W>(e);
  F spp = vsel(pos, x, zero) + l1p;   // softplus(x)
  F spn = vsel(pos, zero, -x) + l1p;  // softplus(-x)
  F ts = t * a.ls_scale + a.ls_add;
  F ce = spp - x * ts;
  F q, r, lq;
  if (BINARY) {
    auto one = t == 1.0f;
    q = vsel(one, om, p);
    r = vsel(one, p, om);
    lq = -vsel(one, spp, spn);
  } else {
    q = t * om + (1.0f - t) * p;
    auto qp = q > 0.0f;
    r = vsel(qp, p * om / vsel(qp, q, vsplat<F>(1.0f)), zero);
    F lg = vlog<W>(vsel(q > std::numeric_limits<float>::min(), q, vsplat<F>(std::numeric_limits<float>::min())));
    lq = vsel(t == 1.0f, -spp, vsel(t == 0.0f, -spn, lg));
  }
  F mod;
  switch (a.gmode) {
    case 0: mod = vsplat<F>(1.0f); break;
    case 1: mod = q; break;
    case 2: mod = q * q; break;
    default: mod = vexp<W>(a.gamma * lq); break;
  }
  F wa = w * (t * a.alpha1 + (1.0f - t) * a.alpha0);
  loss = wa * mod * ce;
  F g = mod * (p - ts);
  if (a.gmode != 0) g = g + a.gamma * mod * (1.0f - 2.0f * t) * r * ce;
  grad = wa * g;
}

template <int W, class T, bool DENSE>
EFFOPS_VM_INLINE void focal_span(const FocalArgs& a, const T* x, const float* t, const float* w, int64_t n,
                                 float* loss, T* grad, typename Vec<W>::F& acc, float& acc1) {
  using F = typename Vec<W>::F;
  using F1 = typename Vec<4>::F;
  constexpr int L = Vec<W>::L;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    F lv, gv;
    focal_vec<W, !DENSE>(vload<W>(x + j), vload<W>(t + j), vload<W>(w + j), a, lv, gv);
    if (loss) vstore<W>(loss + j, lv);
    else acc += lv;
    if (grad) vstore<W>(grad + j, gv);
  }
  for (; j < n; ++j) {
    F1 lv, gv;
    focal_vec<4, !DENSE>(vload<4>(x + j), vload<4>(t + j), vload<4>(w + j), a, lv, gv);
    if (loss) vstore<4>(loss + j, lv);
    else acc1 += lv[0];
    if (grad) vstore<4>(grad + j, gv);
  }
}

// Rows [r0, r1) of the task; returns the task's loss sum.
template <int W, class T, bool DENSE>
EFFOPS_VM_INLINE double focal_task(const FocalArgs& a, int64_t r0, int64_t r1, float* buf) {
  using F = typename Vec<W>::F;
  const int64_t C = a.C;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / C);
  const T* X = static_cast<const T*>(a.x);
  T* G = static_cast<T*>(a.grad);
  double total = 0.0;
  for (int64_t c0 = r0; c0 < r1; c0 += rows_per_chunk) {
    const int64_t c1 = std::min(r1, c0 + rows_per_chunk);
    const int64_t n = (c1 - c0) * C, off = c0 * C;
    float* tb = buf;
    float* wb = buf + rows_per_chunk * C;
    const float* t;
    if (DENSE) {
      t = a.dense + off;
    } else {
      std::fill(tb, tb + n, 0.0f);
      for (int64_t r = c0; r < c1; ++r) {
        const int64_t c = a.cls[r];
        if (c >= 0 && c < C) tb[(r - c0) * C + c] = 1.0f;
        if (c >= C) {
          int64_t none = -1;
          a.bad_class->compare_exchange_strong(none, c);
        }
      }
      t = tb;
    }
    // weights: 0 for ignored rows (class -2) and elements, else 1
    bool all_one = DENSE && a.ignore_mode == 0;
    if (!all_one) {
      if (a.ignore_mode == 2) {
        for (int64_t j = 0; j < n; ++j) wb[j] = a.ignore[off + j] ? 0.0f : 1.0f;
      } else {
        std::fill(wb, wb + n, 1.0f);
      }
      for (int64_t r = c0; r < c1; ++r) {
        bool ign = (!DENSE && a.cls[r] == -2) || (a.ignore_mode == 1 && a.ignore[r]);
        if (ign) std::fill(wb + (r - c0) * C, wb + (r - c0 + 1) * C, 0.0f);
      }
    } else {
      std::fill(wb, wb + n, 1.0f);
    }
    F acc = vsplat<F>(0.0f);
    float acc1 = 0.0f;
    focal_span<W, T, DENSE>(a, X + off, t, wb, n, a.loss ? a.loss + off : nullptr, G ? G + off : nullptr, acc, acc1);
    if (!a.loss) total += static_cast<double>(hsum<W>(acc)) + acc1;
  }
  return total;
}

#if EFFOPS_X86
template <class T, bool D>
EFFOPS_TARGET_V4 double task_v4(const FocalArgs& a, int64_t r0, int64_t r1, float* b) {
  return focal_task<64, T, D>(a, r0, r1, b);
}
template <class T, bool D>
EFFOPS_TARGET_V3 double task_v3(const FocalArgs& a, int64_t r0, int64_t r1, float* b) {
  return focal_task<32, T, D>(a, r0, r1, b);
}
#endif
template <class T, bool D>
double task_base(const FocalArgs& a, int64_t r0, int64_t r1, float* b) {
  return focal_task<16, T, D>(a, r0, r1, b);
}

template <class T, bool D>
void run(const FocalArgs& a, int threads) {
  const int64_t rpt = focal_rows_per_task(a.C);
  const int64_t tasks = (a.N + rpt - 1) / rpt;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / a.C);
  const int workers = max_workers(tasks, threads);
  std::vector<std::vector<float>> bufs(workers, std::vector<float>(2 * rows_per_chunk * a.C));
  const Isa level = isa();
  parallel_for(tasks, threads, [&](int64_t task, int worker) {
    const int64_t r0 = task * rpt, r1 = std::min(a.N, r0 + rpt);
    float* b = bufs[worker].data();
    double s;
#if EFFOPS_X86
    if (level == kV4) s = task_v4<T, D>(a, r0, r1, b);
    else if (level == kV3) s = task_v3<T, D>(a, r0, r1, b);
    else s = task_base<T, D>(a, r0, r1, b);
#else
    (void)level;
    s = task_base<T, D>(a, r0, r1, b);
#endif
    if (a.partial) a.partial[task] = s;
  });
}

// dst[i] = src[i] * f (float32 math, rounded once to the storage type), elements [i0, i1).
template <int W, class T>
EFFOPS_VM_INLINE void scale_span(const T* src, int64_t i0, int64_t i1, float f, T* dst) {
  constexpr int L = Vec<W>::L;
  int64_t j = i0;
  for (; j + L <= i1; j += L) vstore<W>(dst + j, vload<W>(src + j) * f);
  for (; j < i1; ++j) vstore<4>(dst + j, vload<4>(src + j) * f);
}
#if EFFOPS_X86
template <class T>
EFFOPS_TARGET_V4 void scale_v4(const T* s, int64_t i0, int64_t i1, float f, T* d) {
  scale_span<64, T>(s, i0, i1, f, d);
}
template <class T>
EFFOPS_TARGET_V3 void scale_v3(const T* s, int64_t i0, int64_t i1, float f, T* d) {
  scale_span<32, T>(s, i0, i1, f, d);
}
#endif
template <class T>
void scale_base(const T* s, int64_t i0, int64_t i1, float f, T* d) {
  scale_span<16, T>(s, i0, i1, f, d);
}

template <class T>
void scale_run(const void* src, int64_t n, float f, void* dst, int threads) {
  const T* s = static_cast<const T*>(src);
  T* d = static_cast<T*>(dst);
  const int64_t tasks = (n + kTaskElems - 1) / kTaskElems;
  const Isa level = isa();
  parallel_for(tasks, threads, [&](int64_t task, int) {
    const int64_t i0 = task * kTaskElems, i1 = std::min(n, i0 + kTaskElems);
#if EFFOPS_X86
    if (level == kV4) return scale_v4<T>(s, i0, i1, f, d);
    if (level == kV3) return scale_v3<T>(s, i0, i1, f, d);
#endif
    (void)level;
    scale_base<T>(s, i0, i1, f, d);
  });
}

template <class T>
void run_t(const FocalArgs& a, int threads) {
  if (a.dense) run<T, true>(a, threads);
  else run<T, false>(a, threads);
}

}  // namespace

int64_t focal_rows_per_task(int64_t C) { return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(C, 1)); }

void scale_grad(const void* src, int storage, int64_t n, float factor, void* dst, int threads) {
  if (n == 0) return;
  advise_huge(dst, n * (storage == kStoreF32 ? 4 : 2));
  switch (storage) {
    case kStoreBF16: return scale_run<uint16_t>(src, n, factor, dst, threads);
    case kStoreF16: return scale_run<_Float16>(src, n, factor, dst, threads);
    default: return scale_run<float>(src, n, factor, dst, threads);
  }
}

void focal_forward(const FocalArgs& a, int storage, int threads) {
  if (a.N == 0 || a.C == 0) return;
  const int64_t n = a.N * a.C;
  if (a.grad) advise_huge(a.grad, n * (storage == kStoreF32 ? 4 : 2));
  if (a.loss) advise_huge(a.loss, n * 4);
  switch (storage) {
    case kStoreBF16: return run_t<uint16_t>(a, threads);
    case kStoreF16: return run_t<_Float16>(a, threads);
    default: return run_t<float>(a, threads);
  }
}

}  // namespace effops::losses
