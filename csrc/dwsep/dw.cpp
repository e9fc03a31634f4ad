// Depthwise convolution kernels (CPU, NHWC): forward with fused affine, activation and the SE
// channel sums; backward (input and weight gradients of the raw convolution).
//
// Work is split into tasks of a few output (or input) rows of one image. Each task body is
// compiled per ISA level (EFFOPS_ISA_DISPATCH_W); the forward's row kernel is out of line, one
// copy per level in its own translation unit (dw_core.h, dw_row_impl.h). Channel
// sums and weight gradients are reduced from per-task partials in task order, so results do not
// depend on the thread count.
#include <algorithm>
#include <vector>

#include "common/parallel.h"
#include "dwsep/conv.h"
#include "dwsep/dw_core.h"

namespace effops::dwsep {
namespace {

// Rows per task: enough tasks to balance the threads, enough rows to amortise a task.
int64_t rows_per_task(int64_t n_images, int64_t rows, int threads) {
  if (n_images <= 0) return 1;  // no images, no tasks (and no division by zero)
  const int64_t want = std::max<int64_t>(1, 4 * threads);
  const int64_t per_image = std::max<int64_t>(1, (want + n_images - 1) / n_images);
  return std::max<int64_t>(1, (rows + per_image - 1) / per_image);
}

template <class T>
struct FwdArgs {
  const T* x;
  const Acc<T>* taps;
  const Acc<T>* scale;
  const Acc<T>* bias;
  ConvGeom g;
  int act, in_act;
  T* y;
  Acc<T>* task_sums;  // [tasks, C] or null
  int64_t rpt, blocks;
};

template <int W, class T>
EFFOPS_INLINE void fwd_task_body(const FwdArgs<T>& a, int64_t task) {
  using F = Acc<T>;
  const ConvGeom& g = a.g;
  const int64_t n = task / a.blocks, oh0 = (task % a.blocks) * a.rpt;
  const int64_t oh1 = std::min(g.Ho, oh0 + a.rpt);
  if (oh0 >= oh1) return;
  F* sums = a.task_sums ? a.task_sums + task * g.C : nullptr;
  if (sums) std::fill(sums, sums + g.C, F(0));
  const T* xn = a.x + n * g.H * g.W * g.C;
  T* yn = a.y + n * g.Ho * g.Wo * g.C;
  if (a.in_act == simd::kNone) {
    const T* rows[64];
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const T* pf[2];
      tap_rows(g, oh, xn, 0, rows);
      next_rows(g, oh, xn, pf);
      dw_row<W>(g, rows, a.taps, a.scale, a.bias, a.act, 0, g.Wo, yn + oh * g.Wo * g.C, sums, pf);
    }
    return;
  }
  thread_local std::vector<F> band;
  int64_t ih0, ih1;
  band_of(g, oh0, oh1, ih0, ih1);
  with_act(a.in_act, [&](auto IA) EFFOPS_LAMBDA_INLINE { activate_band<W, T, F, IA()>(xn, g, ih0, ih1, band); });
  const F* rows[64];
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    tap_rows<F>(g, oh, band.data(), ih0, rows);
    dw_row<W>(g, rows, a.taps, a.scale, a.bias, a.act, 0, g.Wo, yn + oh * g.Wo * g.C, sums);
  }
}

// float64 runs at the baseline level only: it exists for gradcheck and tests, never hot, and a
// copy per level would only cost compile time.
EFFOPS_ISA_DISPATCH_W(fwd_task, fwd_task_body, (const FwdArgs<float>& a, int64_t t), (a, t))
void fwd_task(const FwdArgs<double>& a, int64_t t) { fwd_task_body<16>(a, t); }
EFFOPS_ISA_DISPATCH_W(fwd_task, fwd_task_body, (const FwdArgs<simd::bf16>& a, int64_t t), (a, t))

// ---------------------------------------------------------------- backward
template <class F>
struct BwdArgs {
  const F* a;
  const F* taps;
  const F* gd;
  ConvGeom g;
  F* ga;
  F* task_gw;  // [tasks, KH*KW*C]
  int64_t rpt, blocks;
};

// Along one axis: the output positions o that read input position i, and the tap t they read
// it with (i = o * stride - pad + t * dil); returns how many (at most k).
EFFOPS_INLINE int64_t readers_of(int64_t i, int64_t pad, int64_t k, int64_t dil, int64_t stride,
                                 int64_t n_out, int64_t* outs, int64_t* taps) {
  int64_t n = 0;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t v = i + pad - t * dil;
    if (v < 0 || v % stride) continue;
    const int64_t o = v / stride;
    if (o >= n_out) continue;
    outs[n] = o, taps[n] = t, ++n;
  }
  return n;
}

// dL/da by gathering, for each input pixel, the output pixels whose taps read it.
template <int W, class F>
EFFOPS_INLINE void bwd_input_body(const BwdArgs<F>& b, int64_t task) {
  using V = typename simd::Traits<F, W>::V;
  constexpr int64_t L = simd::Traits<F, W>::L;
  const ConvGeom& g = b.g;
  const int64_t C = g.C, CL = C / L * L;
  const int64_t n = task / b.blocks, ih0 = (task % b.blocks) * b.rpt;
  const int64_t ih1 = std::min(g.H, ih0 + b.rpt);
  const F* gdn = b.gd + n * g.Ho * g.Wo * C;
  for (int64_t ih = ih0; ih < ih1; ++ih) {
    int64_t ohs[64], khs[64];
    const int64_t nk = readers_of(ih, g.pt, g.KH, g.dh, g.sh, g.Ho, ohs, khs);
    for (int64_t iw = 0; iw < g.W; ++iw) {
      int64_t ows[64], kws[64];
      const int64_t nw = readers_of(iw, g.pl, g.KW, g.dw, g.sw, g.Wo, ows, kws);
      F* o = b.ga + ((n * g.H + ih) * g.W + iw) * C;
      int64_t c = 0;
      for (; c < CL; c += L) {
        V acc = simd::splat<V>(F(0));
        for (int64_t i = 0; i < nk; ++i)
          for (int64_t j = 0; j < nw; ++j)
            acc += loadv<V>(gdn + (ohs[i] * g.Wo + ows[j]) * C + c) *
                   loadv<V>(b.taps + (khs[i] * g.KW + kws[j]) * C + c);
        storev(o + c, acc);
      }
      for (; c < C; ++c) {
        F acc = F(0);
        for (int64_t i = 0; i < nk; ++i)
          for (int64_t j = 0; j < nw; ++j)
            acc += gdn[(ohs[i] * g.Wo + ows[j]) * C + c] * b.taps[(khs[i] * g.KW + kws[j]) * C + c];
        o[c] = acc;
      }
    }
  }
}

// dL/dtaps partial over output rows [oh0, oh1) of one image.
template <int W, class F>
EFFOPS_INLINE void bwd_weight_body(const BwdArgs<F>& b, int64_t task) {
  using V = typename simd::Traits<F, W>::V;
  constexpr int64_t L = simd::Traits<F, W>::L;
  const ConvGeom& g = b.g;
  const int64_t C = g.C, CL = C / L * L;
  const int64_t n = task / b.blocks, oh0 = (task % b.blocks) * b.rpt;
  const int64_t oh1 = std::min(g.Ho, oh0 + b.rpt);
  F* gw = b.task_gw + task * g.KH * g.KW * C;
  std::fill(gw, gw + g.KH * g.KW * C, F(0));
  const F* an = b.a + n * g.H * g.W * C;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const F* rows[64];
    tap_rows(g, oh, an, 0, rows);
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      const F* gdp = b.gd + ((n * g.Ho + oh) * g.Wo + ow) * C;
      const int64_t iw0 = ow * g.sw - g.pl;
      for (int64_t kh = 0; kh < g.KH; ++kh) {
        if (!rows[kh]) continue;
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          const int64_t iw = iw0 + kw * g.dw;
          if (iw < 0 || iw >= g.W) continue;
          const F* ap = rows[kh] + iw * C;
          F* wp = gw + (kh * g.KW + kw) * C;
          int64_t c = 0;
          for (; c < CL; c += L) storev(wp + c, loadv<V>(wp + c) + loadv<V>(gdp + c) * loadv<V>(ap + c));
          for (; c < C; ++c) wp[c] += gdp[c] * ap[c];
        }
      }
    }
  }
}

EFFOPS_ISA_DISPATCH_W(bwd_input, bwd_input_body, (const BwdArgs<float>& b, int64_t t), (b, t))
void bwd_input(const BwdArgs<double>& b, int64_t t) { bwd_input_body<16>(b, t); }
EFFOPS_ISA_DISPATCH_W(bwd_weight, bwd_weight_body, (const BwdArgs<float>& b, int64_t t), (b, t))
void bwd_weight(const BwdArgs<double>& b, int64_t t) { bwd_weight_body<16>(b, t); }

void check_kernel_size(const ConvGeom& g) {
  if (g.KH > 64 || g.KW > 64) throw std::invalid_argument("depthwise kernels larger than 64x64 are not supported");
}

}  // namespace

template <class T>
void dw_forward(const T* x, const Acc<T>* taps, const Acc<T>* scale, const Acc<T>* bias,
                const ConvGeom& g, int act, int in_act, T* y, Acc<T>* sums, int threads) {
  check_kernel_size(g);
  threads = threads_for(double(g.N) * g.Ho * g.Wo * g.C * g.KH * g.KW, threads);
  FwdArgs<T> a{x, taps, scale, bias, g, act, in_act, y, nullptr, 0, 0};
  a.rpt = rows_per_task(g.N, g.Ho, threads);
  a.blocks = (g.Ho + a.rpt - 1) / a.rpt;
  const int64_t tasks = g.N * a.blocks;
  std::vector<Acc<T>> part;
  if (sums) {
    part.resize(static_cast<size_t>(tasks * g.C));
    a.task_sums = part.data();
  }
  parallel_for(tasks, threads, [&](int64_t t, int) { fwd_task(a, t); });
  if (sums) {
    std::fill(sums, sums + g.N * g.C, Acc<T>(0));
    for (int64_t t = 0; t < tasks; ++t) {
      if ((t % a.blocks) * a.rpt >= g.Ho) continue;
      Acc<T>* s = sums + (t / a.blocks) * g.C;
      for (int64_t c = 0; c < g.C; ++c) s[c] += part[t * g.C + c];
    }
  }
}

template <class F>
void dw_backward(const F* a, const F* taps, const F* gd, const ConvGeom& g, F* ga, F* gw,
                 int threads) {
  check_kernel_size(g);
  threads = threads_for(2.0 * g.N * g.Ho * g.Wo * g.C * g.KH * g.KW, threads);
  BwdArgs<F> b{a, taps, gd, g, ga, nullptr, 0, 0};
  b.rpt = rows_per_task(g.N, g.H, threads);
  b.blocks = (g.H + b.rpt - 1) / b.rpt;
  parallel_for(g.N * b.blocks, threads, [&](int64_t t, int) { bwd_input(b, t); });
  BwdArgs<F> w = b;
  w.rpt = rows_per_task(g.N, g.Ho, threads);
  w.blocks = (g.Ho + w.rpt - 1) / w.rpt;
  const int64_t tasks = g.N * w.blocks, taps_c = g.KH * g.KW * g.C;
  std::vector<F> part(static_cast<size_t>(tasks * taps_c));
  w.task_gw = part.data();
  parallel_for(tasks, threads, [&](int64_t t, int) { bwd_weight(w, t); });
  std::fill(gw, gw + taps_c, F(0));
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t i = 0; i < taps_c; ++i) gw[i] += part[t * taps_c + i];
}

template void dw_forward<float>(const float*, const float*, const float*, const float*,
                                const ConvGeom&, int, int, float*, float*, int);
template void dw_forward<double>(const double*, const double*, const double*, const double*,
                                 const ConvGeom&, int, int, double*, double*, int);
template void dw_forward<simd::bf16>(const simd::bf16*, const float*, const float*, const float*,
                                     const ConvGeom&, int, int, simd::bf16*, float*, int);
template void dw_backward<float>(const float*, const float*, const float*, const ConvGeom&,
                                 float*, float*, int);
template void dw_backward<double>(const double*, const double*, const double*, const ConvGeom&,
                                  double*, double*, int);

}  // namespace effops::dwsep
