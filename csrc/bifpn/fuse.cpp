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
  const int64_t per_image = std::max<int64_t>(1, (want + N - 1) / N);
  p.rpt = std::max<int64_t>(1, (Ho + per_image - 1) / per_image);
  p.blocks = (Ho + p.rpt - 1) / p.rpt;
  return p;
}

// The resampled value of input i at output pixel (n, oh, ow), channel vector c.
template <class T, class V>
EFFOPS_INLINE V sample(const Plan<T>& p, size_t i, int64_t n, int64_t oh, int64_t ow, int64_t c) {
  const Input<T>& in = p.in[i];
  const int64_t C = p.C;
  if (in.mode == kIdentity) return loadv(in.x + ((n * in.H + oh) * in.W + ow) * C + c);
  if (in.mode == kNearest)
    return loadv(in.x + ((n * in.H + p.src_h[i][oh]) * in.W + p.src_w[i][ow]) * C + c);
  using S = simd::elem_t<V>;
  // int vector of the same width (for the NaN bookkeeping below)
  typedef std::conditional_t<sizeof(S) == 4, int32_t, int64_t> I;
  typedef I VI __attribute__((vector_size(sizeof(V))));
  constexpr I kAbs = sizeof(S) == 4 ? I(0x7fffffff) : I(0x7fffffffffffffffLL);
  constexpr I kInf = sizeof(S) == 4 ? I(0x7f800000) : I(0x7ff0000000000000LL);
  constexpr I kQNaN = sizeof(S) == 4 ? I(0x7fc00000) : I(0x7ff8000000000000LL);
  V m = simd::splat<V>(-std::numeric_limits<S>::infinity());
  VI nan = {};
  const int64_t h0 = 2 * oh - p.pt[i], w0 = 2 * ow - p.pl[i];
  for (int64_t dh = 0; dh < 3; ++dh) {
    const int64_t h = h0 + dh;
    if (h < 0 || h >= in.H) continue;
    for (int64_t dw = 0; dw < 3; ++dw) {
      const int64_t w = w0 + dw;
      if (w < 0 || w >= in.W) continue;
      const V v = loadv(in.x + ((n * in.H + h) * in.W + w) * C + c);
      // torch lets a NaN in the window win. NaNs are tracked with integer ops and blended in at
      // the end: GCC scalarises a select on an unordered (NaN) comparison in these clones.
      VI bits;
      std::memcpy(&bits, &v, sizeof v);
      nan |= (bits & kAbs) > kInf;
      m = v > m ? v : m;
    }
  }
  VI mb;
  std::memcpy(&mb, &m, sizeof m);
  mb = (nan & kQNaN) | (~nan & mb);
  std::memcpy(&m, &mb, sizeof m);
  return m;
}

template <class T, class S>
S sample_s(const Plan<T>& p, size_t i, int64_t n, int64_t oh, int64_t ow, int64_t c) {
  const Input<T>& in = p.in[i];
  const int64_t C = p.C;
  if (in.mode == kIdentity) return to_f(in.x[((n * in.H + oh) * in.W + ow) * C + c]);
  if (in.mode == kNearest) return to_f(in.x[((n * in.H + p.src_h[i][oh]) * in.W + p.src_w[i][ow]) * C + c]);
  S m = -std::numeric_limits<S>::infinity();
  const int64_t h0 = 2 * oh - p.pt[i], w0 = 2 * ow - p.pl[i];
  for (int64_t h = std::max<int64_t>(h0, 0); h < std::min(h0 + 3, in.H); ++h)
    for (int64_t w = std::max<int64_t>(w0, 0); w < std::min(w0 + 3, in.W); ++w) {
      const S v = to_f(in.x[((n * in.H + h) * in.W + w) * C + c]);
      if (v > m || std::isnan(v)) m = v;
    }
  return m;
}

// ------------------------------------------------------------------------ forward
template <class T>
EFFOPS_INLINE void fwd_body(const Plan<T>& p, T* out, int64_t task) {
  using F = typename simd::Traits<T>::F;
  using V = typename simd::Traits<T>::V;
  constexpr int64_t L = simd::Traits<T>::L;
  const int64_t n = task / p.blocks, oh0 = (task % p.blocks) * p.rpt;
  const int64_t C = p.C, CL = C / L * L;
  for (int64_t oh = oh0; oh < std::min(p.Ho, oh0 + p.rpt); ++oh)
    for (int64_t ow = 0; ow < p.Wo; ++ow) {
      T* o = out + ((n * p.Ho + oh) * p.Wo + ow) * C;
      int64_t c = 0;
      for (; c < CL; c += L) {
        V acc = simd::splat<V>(F(0));
        for (size_t i = 0; i < p.in.size(); ++i) acc += F(p.in[i].w) * sample<T, V>(p, i, n, oh, ow, c);
        storev(o + c, simd::act_v(acc, p.act));
      }
      for (; c < C; ++c) {
        F acc = 0;
        for (size_t i = 0; i < p.in.size(); ++i) acc += F(p.in[i].w) * sample_s<T, F>(p, i, n, oh, ow, c);
        simd::store_s(o + c, simd::act_s(acc, p.act));
      }
    }
}

EFFOPS_CONV_CLONES void fwd_task(const Plan<float>& p, float* o, int64_t t) { fwd_body(p, o, t); }
EFFOPS_CONV_CLONES void fwd_task(const Plan<double>& p, double* o, int64_t t) { fwd_body(p, o, t); }
EFFOPS_CONV_CLONES void fwd_task(const Plan<simd::bf16>& p, simd::bf16* o, int64_t t) { fwd_body(p, o, t); }

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
  std::vector<F> v(k);
  for (int64_t oh = oh0; oh < std::min(p.Ho, oh0 + p.rpt); ++oh)
    for (int64_t ow = 0; ow < p.Wo; ++ow) {
      const int64_t o = ((n * p.Ho + oh) * p.Wo + ow) * C;
      for (int64_t c = 0; c < C; ++c) {
        F pre = 0;
        for (size_t i = 0; i < k; ++i) {
          v[i] = sample_s<T, F>(p, i, n, oh, ow, c);
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
  parallel_for(N * p.blocks, work > (1 << 20) ? threads : 1, [&](int64_t t, int) { fwd_task(p, out, t); });
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
