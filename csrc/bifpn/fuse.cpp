// BiFPN weighted fusion on the CPU (NHWC). Each output pixel reads its inputs through their
// resample modes directly - identity, nearest (precomputed index tables, ATen's rule), 3x3/2 max
// pool (TF 'same' or symmetric padding, pads as -inf) - and is written once.
//
// Backward: pass 1 recomputes the fused pre-activation per pixel, writes g * act'(pre) and
// accumulates each weight's gradient; pass 2, per input, gathers the gradient into each input
// pixel from the output pixels that read it (identity: one; nearest: the preimage of the index
// map; max pool: the windows whose argmax it is - first maximum in scan order, NaN wins, as
// torch's max_pool2d). Gathers write disjoint outputs, so tasks run in parallel without atomics,
// and per-task partial sums are reduced in task order (results independent of thread count).
#include "bifpn/fuse.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/errors.h"
#include "common/parallel.h"

namespace effops::bifpn {
namespace {

using simd::loadv;
using simd::storev;
using simd::to_f;

int64_t nearest_src(int64_t dst, int64_t n_in, int64_t n_out) {
  if (n_in == n_out) return dst;
  const float scale = static_cast<float>(n_in) / static_cast<float>(n_out);
  return std::min<int64_t>(static_cast<int64_t>(std::floor(static_cast<float>(dst) * scale)), n_in - 1);
}

template <class T>
struct Plan {
  std::vector<Input<T>> in;
  int64_t N, C, Ho, Wo;
  int act;
  std::vector<std::vector<int64_t>> src_h, src_w;  // nearest tables per input
  std::vector<int64_t> pt, pl;                     // pool paddings per input
  int64_t rpt, blocks;                             // output rows per task, tasks per image
};

template <class T>
Plan<T> make_plan(const std::vector<Input<T>>& in, int64_t N, int64_t C, int64_t Ho, int64_t Wo,
                  int act, int threads) {
  Plan<T> p{in, N, C, Ho, Wo, act, {}, {}, {}, {}, 0, 0};
  for (const auto& i : in) {
    std::vector<int64_t> sh, sw;
    int64_t t = 0, l = 0;
    if (i.mode == kNearest) {
      for (int64_t d = 0; d < Ho; ++d) sh.push_back(nearest_src(d, i.H, Ho));
      for (int64_t d = 0; d < Wo; ++d) sw.push_back(nearest_src(d, i.W, Wo));
    } else if (i.mode == kMaxPool) {  // TF same: total = max((out-1)*2 + 3 - in, 0), top = total/2
      t = std::max<int64_t>((Ho - 1) * 2 + 3 - i.H, 0) / 2;
      l = std::max<int64_t>((Wo - 1) * 2 + 3 - i.W, 0) / 2;
    } else if (i.mode == kMaxPoolSym) {
      t = l = 1;
    }
    p.src_h.push_back(sh), p.src_w.push_back(sw), p.pt.push_back(t), p.pl.push_back(l);
  }
  const int64_t want = std::max(1, 4 * threads);
  const int64_t per_image = N > 0 ? std::max<int64_t>(1, (want + N - 1) / N) : 1;  // N = 0: no tasks
  p.rpt = std::max<int64_t>(1, (Ho + per_image - 1) / per_image);
  p.blocks = (Ho + p.rpt - 1) / p.rpt;
  return p;
}

// ------------------------------------------------------------------------ forward
// Where input i's values at one output pixel come from: one pixel (identity, nearest, or a pool
// window with one valid tap) or the valid taps of a max-pool window. Found once per pixel, so
// the channel loop only loads.
template <class T>
struct Taps {
  const T* at[9];
  int n;
};

template <class T>
EFFOPS_INLINE void taps_of(const Plan<T>& p, size_t i, int64_t n, int64_t oh, int64_t ow, Taps<T>& t) {
  const Input<T>& in = p.in[i];
  const int64_t C = p.C;
  if (in.mode == kIdentity || in.mode == kNearest) {
    const int64_t h = in.mode == kIdentity ? oh : p.src_h[i][oh], w = in.mode == kIdentity ? ow : p.src_w[i][ow];
    t.at[0] = in.x + ((n * in.H + h) * in.W + w) * C;
    t.n = 1;
    return;
  }
  t.n = 0;
  const int64_t h0 = 2 * oh - p.pt[i], w0 = 2 * ow - p.pl[i];
  for (int64_t h = std::max<int64_t>(h0, 0); h < std::min(h0 + 3, in.H); ++h)
    for (int64_t w = std::max<int64_t>(w0, 0); w < std::min(w0 + 3, in.W); ++w)
      t.at[t.n++] = in.x + ((n * in.H + h) * in.W + w) * C;
}

// The max over a window's taps at channels [c, c + L); a NaN anywhere wins (as in torch).
template <class T, class V>
EFFOPS_INLINE V window_max(const Taps<T>& t, int64_t c) {
  using S = simd::elem_t<V>;
  // NaNs are tracked with integer ops and blended in at the end: GCC scalarises a select on an
  // unordered (NaN) comparison in the target clones.
  typedef std::conditional_t<sizeof(S) == 4, int32_t, int64_t> I;
  using VI = typename simd::VecOf<I, sizeof(V)>::type;
  constexpr I kAbs = sizeof(S) == 4 ? I(0x7fffffff) : I(0x7fffffffffffffffLL);
  constexpr I kInf = sizeof(S) == 4 ? I(0x7f800000) : I(0x7ff0000000000000LL);
  constexpr I kQNaN = sizeof(S) == 4 ? I(0x7fc00000) : I(0x7ff8000000000000LL);
  V m = simd::splat<V>(-std::numeric_limits<S>::infinity());
  VI nan = {};
  for (int j = 0; j < t.n; ++j) {
    const V v = loadv<V>(t.at[j] + c);
    VI bits;
    std::memcpy(&bits, &v, sizeof v);
    nan |= (bits & kAbs) > kInf;
    m = v > m ? v : m;
  }
  VI mb;
  std::memcpy(&mb, &m, sizeof m);
  mb = (nan & kQNaN) | (~nan & mb);
  std::memcpy(&m, &mb, sizeof m);
  return m;
}

template <class T, class S>
EFFOPS_INLINE S window_max_s(const Taps<T>& t, int64_t c) {
  S m = -std::numeric_limits<S>::infinity();
  for (int j = 0; j < t.n; ++j) {
    const S v = to_f(t.at[j][c]);
    if (v > m || std::isnan(v)) m = v;
  }
  return m;
}

// One input's contribution to `len` accumulator values: acc = w * v (kInit), acc += w * v, and on
// the last input out = act(acc) (kFinish) instead of storing acc. Load(j) gives the input's
// vector at j, LoadS(j) its scalar.
enum Step : int { kAdd = 0, kInit = 1, kFinish = 2 };

template <int W, int S, class T, class F, class Load, class LoadS>
EFFOPS_INLINE void combine(F* acc, T* out, int64_t len, F w, int act, Load load, LoadS load_s) {
  using V = typename simd::Traits<T, W>::V;
  constexpr int64_t L = simd::Traits<T, W>::L;
  int64_t j = 0;
  for (; j + L <= len; j += L) {
    V a = w * load(j);
    if constexpr (!(S & kInit)) a += loadv<V>(acc + j);
    if constexpr (S & kFinish)
      storev(out + j, simd::act_v(a, act));
    else
      storev(acc + j, a);
  }
  for (; j < len; ++j) {
    F a = w * load_s(j);
    if constexpr (!(S & kInit)) a += acc[j];
    if constexpr (S & kFinish)
      simd::store_s(out + j, simd::act_s(a, act));
    else
      acc[j] = a;
  }
}

// Input i's contribution to output row (n, oh). Identity rows are one contiguous run; nearest
// inputs go pixel by pixel; a max pool takes the max over its (up to 3) input rows for the
// whole row first (into `vm`, W * C values), then over 3 columns of that per output pixel.
template <int W, int S, class T, class F>
EFFOPS_INLINE void row_step(const Plan<T>& p, size_t i, int64_t n, int64_t oh, F* acc, F* vm, T* out) {
  using V = typename simd::Traits<T, W>::V;
  constexpr int64_t L = simd::Traits<T, W>::L;
  const Input<T>& in = p.in[i];
  const int64_t C = p.C;
  const F w = F(in.w);
  if (in.mode == kIdentity) {
    const T* x = in.x + (n * in.H + oh) * in.W * C;
    combine<W, S>(acc, out, p.Wo * C, w, p.act, [&](int64_t j) { return loadv<V>(x + j); },
               [&](int64_t j) { return to_f(x[j]); });
    return;
  }
  if (in.mode == kNearest) {
    const T* row = in.x + (n * in.H + p.src_h[i][oh]) * in.W * C;
    for (int64_t ow = 0; ow < p.Wo; ++ow) {
      const T* x = row + p.src_w[i][ow] * C;
      combine<W, S>(acc + ow * C, out + ow * C, C, w, p.act, [&](int64_t j) { return loadv<V>(x + j); },
                 [&](int64_t j) { return to_f(x[j]); });
    }
    return;
  }
  Taps<T> rows;
  rows.n = 0;
  const int64_t h0 = 2 * oh - p.pt[i];
  for (int64_t h = std::max<int64_t>(h0, 0); h < std::min(h0 + 3, in.H); ++h)
    rows.at[rows.n++] = in.x + (n * in.H + h) * in.W * C;
  const int64_t len = in.W * C;
  int64_t j = 0;
  for (; j + L <= len; j += L) storev(vm + j, window_max<T, V>(rows, j));
  for (; j < len; ++j) vm[j] = window_max_s<T, F>(rows, j);
  Taps<F> cols;
  for (int64_t ow = 0; ow < p.Wo; ++ow) {
    const int64_t w0 = 2 * ow - p.pl[i];
    cols.n = 0;
    for (int64_t x = std::max<int64_t>(w0, 0); x < std::min(w0 + 3, in.W); ++x) cols.at[cols.n++] = vm + x * C;
    combine<W, S>(acc + ow * C, out + ow * C, C, w, p.act, [&](int64_t j) { return window_max<F, V>(cols, j); },
               [&](int64_t j) { return window_max_s<F, F>(cols, j); });
  }
}

// One task: output rows [oh0, oh0 + rpt) of image n, each accumulated in `acc` (Wo * C values,
// the worker's scratch, in L1/L2) input by input, the activation applied with the last input.
template <int W, class T>
EFFOPS_INLINE void fwd_body(const Plan<T>& p, T* out, int64_t task, typename simd::Traits<T>::F* acc) {
  auto* vm = acc + p.Wo * p.C;
  const int64_t n = task / p.blocks, oh0 = (task % p.blocks) * p.rpt;
  const size_t k = p.in.size();
  for (int64_t oh = oh0; oh < std::min(p.Ho, oh0 + p.rpt); ++oh) {
    T* o = out + (n * p.Ho + oh) * p.Wo * p.C;
    row_step<W, kInit>(p, 0, n, oh, acc, vm, o);
    for (size_t i = 1; i + 1 < k; ++i) row_step<W, kAdd>(p, i, n, oh, acc, vm, o);
    row_step<W, kFinish>(p, k - 1, n, oh, acc, vm, o);
  }
}

EFFOPS_ISA_DISPATCH_W(fwd_task, fwd_body, (const Plan<float>& p, float* o, int64_t t, float* acc), (p, o, t, acc))
// float64 at the baseline level only: it exists for gradcheck and tests, never hot.
void fwd_task(const Plan<double>& p, double* o, int64_t t, double* acc) { fwd_body<16>(p, o, t, acc); }
EFFOPS_ISA_DISPATCH_W(fwd_task, fwd_body, (const Plan<simd::bf16>& p, simd::bf16* o, int64_t t, float* acc),
                    (p, o, t, acc))

// ------------------------------------------------------------------------ backward pass 1
// gpre = g * act'(pre); part[task, i] = sum over the task's pixels of gpre * R_i(x_i).
template <class S>
S act_grad_s(S x, int act) {
  switch (act) {
    case simd::kRelu:
      return x > S(0) ? S(1) : S(0);
    case simd::kRelu6:
      return (x > S(0) && x < S(6)) ? S(1) : S(0);
    case simd::kSilu: {
      const S s = S(1) / (S(1) + std::exp(-x));
      return s * (S(1) + x * (S(1) - s));
    }
    case simd::kHardswish:
      return x < S(-3) ? S(0) : (x <= S(3) ? x / S(3) + S(0.5) : S(1));
    case simd::kSigmoid: {
      const S s = S(1) / (S(1) + std::exp(-x));
      return s * (S(1) - s);
    }
    default:
      return S(1);
  }
}

template <class T, class F>
void bwd_pass1(const Plan<T>& p, const F* g, F* gpre, double* part, int64_t task) {
  const int64_t n = task / p.blocks, oh0 = (task % p.blocks) * p.rpt;
  const int64_t C = p.C;
  const size_t k = p.in.size();
  double* pt = part + task * k;
  std::fill(pt, pt + k, 0.0);
  F v[4];
  Taps<T> taps[4];
  for (int64_t oh = oh0; oh < std::min(p.Ho, oh0 + p.rpt); ++oh)
    for (int64_t ow = 0; ow < p.Wo; ++ow) {
      const int64_t o = ((n * p.Ho + oh) * p.Wo + ow) * C;
      for (size_t i = 0; i < k; ++i) taps_of(p, i, n, oh, ow, taps[i]);
      for (int64_t c = 0; c < C; ++c) {
        F pre = 0;
        for (size_t i = 0; i < k; ++i) {
          v[i] = taps[i].n == 1 ? to_f(taps[i].at[0][c]) : window_max_s<T, F>(taps[i], c);
          pre += F(p.in[i].w) * v[i];
        }
        const F gp = g[o + c] * act_grad_s(pre, p.act);
        gpre[o + c] = gp;
        for (size_t i = 0; i < k; ++i) pt[i] += double(gp) * double(v[i]);
      }
    }
}

// ------------------------------------------------------------------------ backward pass 2
// The gradient of input i's rows [h0, h1) of image n, gathered from gpre.
template <class T, class F>
void bwd_pass2(const Plan<T>& p, size_t i, const F* gpre, F* grad, int64_t n, int64_t h0, int64_t h1,
               const std::vector<std::vector<int64_t>>& rows_of, const std::vector<std::vector<int64_t>>& cols_of) {
  const Input<T>& in = p.in[i];
  const int64_t C = p.C;
  const F w = F(in.w);
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t x = 0; x < in.W; ++x) {
      F* gr = grad + ((n * in.H + h) * in.W + x) * C;
      if (in.mode == kIdentity) {
        const F* gp = gpre + ((n * p.Ho + h) * p.Wo + x) * C;
        for (int64_t c = 0; c < C; ++c) gr[c] = w * gp[c];
        continue;
      }
      std::fill(gr, gr + C, F(0));
      if (in.mode == kNearest) {
        for (int64_t oh : rows_of[h])
          for (int64_t ow : cols_of[x]) {
            const F* gp = gpre + ((n * p.Ho + oh) * p.Wo + ow) * C;
            for (int64_t c = 0; c < C; ++c) gr[c] += w * gp[c];
          }
        continue;
      }
      // max pool: the windows (oh, ow) containing (h, x): 2*oh - pt <= h <= 2*oh - pt + 2
      const int64_t ohlo = std::max<int64_t>(0, (h + p.pt[i] - 1) / 2), ohhi = std::min(p.Ho - 1, (h + p.pt[i]) / 2);
      const int64_t owlo = std::max<int64_t>(0, (x + p.pl[i] - 1) / 2), owhi = std::min(p.Wo - 1, (x + p.pl[i]) / 2);
      for (int64_t oh = ohlo; oh <= ohhi; ++oh)
        for (int64_t ow = owlo; ow <= owhi; ++ow) {
          const int64_t wh0 = 2 * oh - p.pt[i], ww0 = 2 * ow - p.pl[i];
          if (h < wh0 || h > wh0 + 2 || x < ww0 || x > ww0 + 2) continue;
          const F* gp = gpre + ((n * p.Ho + oh) * p.Wo + ow) * C;
          for (int64_t c = 0; c < C; ++c) {
            // argmax in scan order over the padded window; pads are -inf and never win
            F m = -std::numeric_limits<F>::infinity();
            int64_t ah = wh0, aw = ww0;
            for (int64_t dh = 0; dh < 3; ++dh)
              for (int64_t dw = 0; dw < 3; ++dw) {
                const int64_t hh = wh0 + dh, xx = ww0 + dw;
                if (hh < 0 || hh >= in.H || xx < 0 || xx >= in.W) continue;
                const F val = to_f(in.x[((n * in.H + hh) * in.W + xx) * C + c]);
                if (val > m || std::isnan(val)) m = val, ah = hh, aw = xx;
              }
            if (ah == h && aw == x) gr[c] += w * gp[c];
          }
        }
    }
}

}  // namespace

template <class T>
void fuse_forward(const std::vector<Input<T>>& in, int64_t N, int64_t C, int64_t Ho, int64_t Wo,
                  int act, T* out, int threads) {
  if (N * C * Ho * Wo == 0) return;
  const Plan<T> p = make_plan(in, N, C, Ho, Wo, act, threads);
  const double work = double(N) * Ho * Wo * C * in.size() * 4;
  const int workers = max_workers(N * p.blocks, work > (1 << 17) ? threads : 1);
  using F = typename simd::Traits<T>::F;
  int64_t per = Wo * C;  // a worker's scratch: the output row's sums, then a pooled row
  for (const auto& x : in) per = std::max(per, Wo * C + x.W * C);
  std::vector<F> acc(static_cast<size_t>(workers * per));
  parallel_for(N * p.blocks, workers, [&](int64_t t, int w) { fwd_task(p, out, t, acc.data() + w * per); });
}

template <class T, class F>
void fuse_backward(const F* g, const std::vector<Input<T>>& in, int64_t N, int64_t C, int64_t Ho,
                   int64_t Wo, int act, const std::vector<F*>& grads, double* gw, int threads) {
  const Plan<T> p = make_plan(in, N, C, Ho, Wo, act, threads);
  const size_t k = in.size();
  std::vector<F> gpre(static_cast<size_t>(N * Ho * Wo * C));
  const int64_t tasks = N * p.blocks;
  std::vector<double> part(static_cast<size_t>(tasks * k));
  parallel_for(tasks, threads, [&](int64_t t, int) { bwd_pass1(p, g, gpre.data(), part.data(), t); });
  for (size_t i = 0; i < k; ++i) {
    gw[i] = 0;
    for (int64_t t = 0; t < tasks; ++t) gw[i] += part[t * k + i];
  }
  for (size_t i = 0; i < k; ++i) {
    const Input<T>& x = in[i];
    std::vector<std::vector<int64_t>> rows_of, cols_of;  // preimages of the nearest index maps
    if (x.mode == kNearest) {
      rows_of.resize(x.H), cols_of.resize(x.W);
      for (int64_t oh = 0; oh < Ho; ++oh) rows_of[p.src_h[i][oh]].push_back(oh);
      for (int64_t ow = 0; ow < Wo; ++ow) cols_of[p.src_w[i][ow]].push_back(ow);
    }
    const int64_t rb = std::max<int64_t>(1, (x.H + 3) / 4);
    const int64_t blocks = (x.H + rb - 1) / rb;
    parallel_for(N * blocks, threads, [&](int64_t t, int) {
      const int64_t n = t / blocks, h0 = (t % blocks) * rb;
      bwd_pass2(p, i, gpre.data(), grads[i], n, h0, std::min(x.H, h0 + rb), rows_of, cols_of);
    });
  }
}

template void fuse_forward<float>(const std::vector<Input<float>>&, int64_t, int64_t, int64_t, int64_t,
                                  int, float*, int);
template void fuse_forward<double>(const std::vector<Input<double>>&, int64_t, int64_t, int64_t, int64_t,
                                   int, double*, int);
template void fuse_forward<simd::bf16>(const std::vector<Input<simd::bf16>>&, int64_t, int64_t, int64_t,
                                       int64_t, int, simd::bf16*, int);
template void fuse_backward<float, float>(const float*, const std::vector<Input<float>>&, int64_t, int64_t,
                                          int64_t, int64_t, int, const std::vector<float*>&, double*, int);
template void fuse_backward<simd::bf16, float>(const float*, const std::vector<Input<simd::bf16>>&, int64_t,
                                               int64_t, int64_t, int64_t, int, const std::vector<float*>&,
                                               double*, int);
template void fuse_backward<double, double>(const double*, const std::vector<Input<double>>&, int64_t, int64_t,
                                            int64_t, int64_t, int, const std::vector<double*>&, double*, int);

}  // namespace effops::bifpn
