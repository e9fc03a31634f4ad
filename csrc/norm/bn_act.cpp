// Training-mode BatchNorm + activation on NHWC rows, forward and backward, in two passes each:
//
//   forward:  (1) per-channel sums of x      -> mean, var, invstd
//             (2) y = act(x * a + b)            a = weight * invstd, b = bias - mean * a
//   backward: (1) per-channel sums of g and g * (x - mean), g = dL/dy * act'(x * a + b)
//             (2) dL/dx = a * (g - sum(g) / M) - a * invstd^2 * sum(g (x - mean)) / M * (x - mean)
//
// PyTorch runs the same thing as batch_norm (two passes), the activation (one more, plus a copy
// of its input when it is in place) and in the backward the activation's gradient and
// batch_norm_backward (three passes, two fresh buffers): the backward here recomputes x * a + b
// and act' instead of reading a stored pre-activation.
//
// Numerics: sums in float over blocks of kFlushRows rows, added into float64 per task; the
// forward sums x - shift (shift = the first row, so that a large mean does not cancel the
// variance away), the backward sums around the batch mean. Rows are split into tasks of
// kTaskRows whatever the thread count, and the tasks' sums are added in task order: the results
// do not depend on the number of threads. Storage float32 / bfloat16 (computed in float32) or
// float64 (computed in float64, at the baseline ISA level: tests and gradcheck).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/isa.h"
#include "common/memory.h"
#include "common/parallel.h"
#include "dwsep/simd.h"
#include "norm/bn_act_api.h"

namespace effops::norm {
namespace {

using simd::bf16;
using simd::loadv;
using simd::splat;
using simd::storev;

constexpr int64_t kTaskRows = 256;
constexpr int64_t kFlushRows = 32;
constexpr int64_t kPad = 16;  // per-channel arrays are padded to a multiple of the widest vector

template <class T>
using F_of = typename simd::Traits<T>::F;

// What one row-range kernel reads and writes. p[]: per-channel float arrays padded to kPad
// (their meaning per kernel is at each kernel; p[5] is per image: the gradient of the pooled
// means / (H * W), zeros without one); acc: scratch of 2 * Cp floats; sum: 2 * Cp doubles (the
// forward apply sums its outputs there when it pools, else sum is null).
template <class T>
struct Rows {
  const T* x;
  const T* gy;
  T* out;
  int64_t C;
  const F_of<T>* p[6];
  int act;
  F_of<T>* acc;
  double* sum;
};

// Vectors of n <= L elements (the channel tail): through a zero-padded buffer.
template <class V, class T>
EFFOPS_INLINE V load_n(const T* p, int64_t n) {
  constexpr int L = sizeof(V) / sizeof(simd::elem_t<V>);
  if (n >= L) return loadv<V>(p);
  T buf[L] = {};
  std::memcpy(buf, p, n * sizeof(T));
  return loadv<V>(buf);
}
template <class V, class T>
EFFOPS_INLINE void store_n(T* p, V v, int64_t n) {
  constexpr int L = sizeof(V) / sizeof(simd::elem_t<V>);
  if (n >= L) return storev(p, v);
  T buf[L];
  storev(buf, v);
  std::memcpy(p, buf, n * sizeof(T));
}

template <int ACT, class V>
EFFOPS_INLINE V act_fwd(V z, int act) {
  using S = simd::elem_t<V>;
  if constexpr (ACT == simd::kSilu) return z / (S(1) + simd::vexp(-z));
  return simd::act_v(z, act);
}

// d act / dz with PyTorch's conventions at the kinks (as ops/dwsep.py's act_grad).
template <int ACT, class V>
EFFOPS_INLINE V act_deriv(V z, int act) {
  using S = simd::elem_t<V>;
  const V one = splat<V>(S(1)), zero = splat<V>(S(0));
  switch (ACT == simd::kActRuntime ? act : ACT) {
    case simd::kRelu:
      return z > S(0) ? one : zero;
    case simd::kRelu6: {
      // 0 < z < 6 as one unsigned compare of the bits: bits(z) - 1 < bits(6) - 1 holds exactly
      // for positive z below 6 (+-0, negatives, 6 and up, NaN all fail). GCC 12 lowered every
      // two-comparison form ((z > 0) & (z < 6), nested or multiplied selects) lane by lane here.
      if constexpr (std::is_same<S, float>::value) {
        using U = typename simd::VecOf<uint32_t, sizeof(V)>::type;
        U u;
        std::memcpy(&u, &z, sizeof u);
        return (u - 1u) < (0x40c00000u - 1u) ? one : zero;
      } else {
        const V lo = z > S(0) ? one : zero;
        return z < S(6) ? lo : zero;
      }
    }
    case simd::kSilu: {
      const V s = S(1) / (S(1) + simd::vexp(-z));
      return s * (S(1) + z * (S(1) - s));
    }
    case simd::kHardswish:
      return z < S(-3) ? zero : (z <= S(3) ? z / S(3) + S(0.5) : one);
    case simd::kSigmoid: {
      const V s = S(1) / (S(1) + simd::vexp(-z));
      return s * (S(1) - s);
    }
    default:
      return one;
  }
}

// Runs body(c, n) for the vectors of a row: c the first channel, n the lanes in use.
template <int L, class B>
EFFOPS_INLINE void for_vectors(int64_t C, B&& body) {
  int64_t c = 0;
  for (; c + L <= C; c += L) body(c, int64_t{L});
  if (c < C) body(c, C - c);
}

// The block sums of acc added into sum, and acc zeroed.
template <class F>
EFFOPS_INLINE void flush(F* acc, double* sum, int64_t Cp) {
  for (int64_t c = 0; c < 2 * Cp; ++c) {
    sum[c] += acc[c];
    acc[c] = F(0);
  }
}

// (1) forward sums: sum[c] += x - shift, sum[Cp + c] += (x - shift)^2. p[0] = shift.
template <int W, class T>
EFFOPS_INLINE void stats_body(const Rows<T>& a, int64_t r0, int64_t r1) {
  using Tr = simd::Traits<T, W>;
  using V = typename Tr::V;
  const int64_t Cp = (a.C + kPad - 1) / kPad * kPad;
  F_of<T>* s1 = a.acc;
  F_of<T>* s2 = a.acc + Cp;
  for (int64_t rb = r0; rb < r1; rb += kFlushRows) {
    const int64_t re = std::min(r1, rb + kFlushRows);
    for (int64_t r = rb; r < re; ++r) {
      const T* xr = a.x + r * a.C;
      for_vectors<Tr::L>(a.C, [&](int64_t c, int64_t n) EFFOPS_LAMBDA_INLINE {
        const V d = load_n<V>(xr + c, n) - loadv<V>(a.p[0] + c);  // tail lanes: 0 - 0
        storev(s1 + c, loadv<V>(s1 + c) + d);
        storev(s2 + c, loadv<V>(s2 + c) + d * d);
      });
    }
    flush(a.acc, a.sum, Cp);
  }
}

// (2) forward: out = act(x * p[0] + p[1]); POOL: sum[c] += out (as stored, rounded to T).
template <int W, int ACT, bool POOL, class T>
EFFOPS_INLINE void apply_loop(const Rows<T>& a, int64_t r0, int64_t r1) {
  using Tr = simd::Traits<T, W>;
  using V = typename Tr::V;
  const int64_t Cp = (a.C + kPad - 1) / kPad * kPad;
  for (int64_t rb = r0; rb < r1; rb += kFlushRows) {
    const int64_t re = std::min(r1, rb + kFlushRows);
    for (int64_t r = rb; r < re; ++r) {
      const T* xr = a.x + r * a.C;
      T* yr = a.out + r * a.C;
      for_vectors<Tr::L>(a.C, [&](int64_t c, int64_t n) EFFOPS_LAMBDA_INLINE {
        const V z = load_n<V>(xr + c, n) * loadv<V>(a.p[0] + c) + loadv<V>(a.p[1] + c);
        const V y = act_fwd<ACT>(z, a.act);
        store_n(yr + c, y, n);
        if constexpr (POOL) {
          // the stored value (bf16: rounded), so the means are those of the output; tail lanes
          // are act(0 * 0 + 0) and are never read
          storev(a.acc + c, loadv<V>(a.acc + c) + (std::is_same<T, bf16>::value ? load_n<V>(yr + c, n) : y));
        }
      });
    }
    if constexpr (POOL) {
      for (int64_t c = 0; c < Cp; ++c) {
        a.sum[c] += a.acc[c];
        a.acc[c] = F_of<T>(0);
      }
    }
  }
}
template <int W, class T>
EFFOPS_INLINE void apply_body(const Rows<T>& a, int64_t r0, int64_t r1) {
  if (a.sum != nullptr) {
    if (a.act == simd::kSilu) return apply_loop<W, simd::kSilu, true>(a, r0, r1);
    return apply_loop<W, simd::kActRuntime, true>(a, r0, r1);
  }
  if (a.act == simd::kSilu) return apply_loop<W, simd::kSilu, false>(a, r0, r1);
  apply_loop<W, simd::kActRuntime, false>(a, r0, r1);
}

// (1) backward sums: g = (gy + p[5]) * act'(x * p[0] + p[1]); sum[c] += g, sum[Cp + c] += g * (x - p[2]).
template <int W, int ACT, class T>
EFFOPS_INLINE void bstats_loop(const Rows<T>& a, int64_t r0, int64_t r1) {
  using Tr = simd::Traits<T, W>;
  using V = typename Tr::V;
  const int64_t Cp = (a.C + kPad - 1) / kPad * kPad;
  F_of<T>* s1 = a.acc;
  F_of<T>* s2 = a.acc + Cp;
  for (int64_t rb = r0; rb < r1; rb += kFlushRows) {
    const int64_t re = std::min(r1, rb + kFlushRows);
    for (int64_t r = rb; r < re; ++r) {
      const T* xr = a.x + r * a.C;
      const T* gr = a.gy + r * a.C;
      for_vectors<Tr::L>(a.C, [&](int64_t c, int64_t n) EFFOPS_LAMBDA_INLINE {
        const V x = load_n<V>(xr + c, n);
        const V g = (load_n<V>(gr + c, n) + loadv<V>(a.p[5] + c)) *
                    act_deriv<ACT>(x * loadv<V>(a.p[0] + c) + loadv<V>(a.p[1] + c), a.act);
        storev(s1 + c, loadv<V>(s1 + c) + g);  // tail lanes: gy = 0, p[5] = 0
        storev(s2 + c, loadv<V>(s2 + c) + g * (x - loadv<V>(a.p[2] + c)));
      });
    }
    flush(a.acc, a.sum, Cp);
  }
}
template <int W, class T>
EFFOPS_INLINE void bstats_body(const Rows<T>& a, int64_t r0, int64_t r1) {
  if (a.act == simd::kSilu) return bstats_loop<W, simd::kSilu>(a, r0, r1);
  bstats_loop<W, simd::kActRuntime>(a, r0, r1);
}

// (2) backward: out = p[0] * g + p[3] * (x - p[2]) + p[4], g as in (1).
template <int W, int ACT, class T>
EFFOPS_INLINE void bapply_loop(const Rows<T>& a, int64_t r0, int64_t r1) {
  using Tr = simd::Traits<T, W>;
  using V = typename Tr::V;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = a.x + r * a.C;
    const T* gr = a.gy + r * a.C;
    T* out = a.out + r * a.C;
    for_vectors<Tr::L>(a.C, [&](int64_t c, int64_t n) EFFOPS_LAMBDA_INLINE {
      const V x = load_n<V>(xr + c, n);
      const V k = loadv<V>(a.p[0] + c);
      const V g = (load_n<V>(gr + c, n) + loadv<V>(a.p[5] + c)) * act_deriv<ACT>(x * k + loadv<V>(a.p[1] + c), a.act);
      store_n(out + c, k * g + loadv<V>(a.p[3] + c) * (x - loadv<V>(a.p[2] + c)) + loadv<V>(a.p[4] + c), n);
    });
  }
}
template <int W, class T>
EFFOPS_INLINE void bapply_body(const Rows<T>& a, int64_t r0, int64_t r1) {
  if (a.act == simd::kSilu) return bapply_loop<W, simd::kSilu>(a, r0, r1);
  bapply_loop<W, simd::kActRuntime>(a, r0, r1);
}

// Per-ISA copies of the four row kernels for float32 and bfloat16 storage; float64 at the
// baseline level only.
#define EFFOPS_BN_KERNELS(T, SUFFIX)                                                                   \
  template <int W>                                                                                    \
  EFFOPS_INLINE void stats_##SUFFIX(const Rows<T>& a, int64_t r0, int64_t r1) {                       \
    stats_body<W, T>(a, r0, r1);                                                                      \
  }                                                                                                   \
  template <int W>                                                                                    \
  EFFOPS_INLINE void apply_##SUFFIX(const Rows<T>& a, int64_t r0, int64_t r1) {                       \
    apply_body<W, T>(a, r0, r1);                                                                      \
  }                                                                                                   \
  template <int W>                                                                                    \
  EFFOPS_INLINE void bstats_##SUFFIX(const Rows<T>& a, int64_t r0, int64_t r1) {                      \
    bstats_body<W, T>(a, r0, r1);                                                                     \
  }                                                                                                   \
  template <int W>                                                                                    \
  EFFOPS_INLINE void bapply_##SUFFIX(const Rows<T>& a, int64_t r0, int64_t r1) {                      \
    bapply_body<W, T>(a, r0, r1);                                                                     \
  }                                                                                                   \
  EFFOPS_ISA_DISPATCH_W(run_stats_##SUFFIX, stats_##SUFFIX, (const Rows<T>& a, int64_t r0, int64_t r1), \
                        (a, r0, r1))                                                                  \
  EFFOPS_ISA_DISPATCH_W(run_apply_##SUFFIX, apply_##SUFFIX, (const Rows<T>& a, int64_t r0, int64_t r1), \
                        (a, r0, r1))                                                                  \
  EFFOPS_ISA_DISPATCH_W(run_bstats_##SUFFIX, bstats_##SUFFIX,                                         \
                        (const Rows<T>& a, int64_t r0, int64_t r1), (a, r0, r1))                      \
  EFFOPS_ISA_DISPATCH_W(run_bapply_##SUFFIX, bapply_##SUFFIX,                                         \
                        (const Rows<T>& a, int64_t r0, int64_t r1), (a, r0, r1))

EFFOPS_BN_KERNELS(float, f32)
EFFOPS_BN_KERNELS(bf16, bf16)
#undef EFFOPS_BN_KERNELS

// The kernels of a storage type: per-ISA for float32 / bfloat16, baseline for float64.
void run_stats(const Rows<float>& a, int64_t r0, int64_t r1) { run_stats_f32(a, r0, r1); }
void run_stats(const Rows<bf16>& a, int64_t r0, int64_t r1) { run_stats_bf16(a, r0, r1); }
void run_stats(const Rows<double>& a, int64_t r0, int64_t r1) { stats_body<16, double>(a, r0, r1); }
void run_apply(const Rows<float>& a, int64_t r0, int64_t r1) { run_apply_f32(a, r0, r1); }
void run_apply(const Rows<bf16>& a, int64_t r0, int64_t r1) { run_apply_bf16(a, r0, r1); }
void run_apply(const Rows<double>& a, int64_t r0, int64_t r1) { apply_body<16, double>(a, r0, r1); }
void run_bstats(const Rows<float>& a, int64_t r0, int64_t r1) { run_bstats_f32(a, r0, r1); }
void run_bstats(const Rows<bf16>& a, int64_t r0, int64_t r1) { run_bstats_bf16(a, r0, r1); }
void run_bstats(const Rows<double>& a, int64_t r0, int64_t r1) { bstats_body<16, double>(a, r0, r1); }
void run_bapply(const Rows<float>& a, int64_t r0, int64_t r1) { run_bapply_f32(a, r0, r1); }
void run_bapply(const Rows<bf16>& a, int64_t r0, int64_t r1) { run_bapply_bf16(a, r0, r1); }
void run_bapply(const Rows<double>& a, int64_t r0, int64_t r1) { bapply_body<16, double>(a, r0, r1); }

// Rows are split into tasks of at most kTaskRows rows of one image, whatever the thread count.
struct Split {
  int64_t HW, per_image, tasks;
  Split(int64_t M, int64_t N) : HW(M / N), per_image((M / N + kTaskRows - 1) / kTaskRows), tasks(N * per_image) {}
  int64_t image(int64_t t) const { return t / per_image; }
  int64_t begin(int64_t t) const { return image(t) * HW + (t % per_image) * kTaskRows; }
  int64_t end(int64_t t) const { return std::min((image(t) + 1) * HW, begin(t) + kTaskRows); }
};

int64_t padded_c(int64_t C) { return (C + kPad - 1) / kPad * kPad; }

// kernel(rows with acc = this worker's scratch and sum = part + t * 2 * Cp, t, r0, r1) for every
// task; returns the tasks' sums [tasks, 2 * Cp] (zeros where the kernel adds nothing).
template <class T, class K>
std::vector<double> run_tasks(const Rows<T>& a, const Split& s, int threads, bool sums, K kernel) {
  const int64_t Cp = padded_c(a.C);
  std::vector<double> part(sums ? static_cast<size_t>(s.tasks * 2 * Cp) : 0, 0.0);
  const int workers = max_workers(s.tasks, threads);
  std::vector<F_of<T>> acc(sums ? static_cast<size_t>(workers * 2 * Cp) : 0, F_of<T>(0));
  parallel_for(s.tasks, threads, [&](int64_t t, int w) {
    Rows<T> b = a;
    b.acc = sums ? acc.data() + w * 2 * Cp : nullptr;
    b.sum = sums ? part.data() + t * 2 * Cp : nullptr;
    kernel(b, t, s.begin(t), s.end(t));
  });
  return part;
}

// The tasks' sums added in task order: out[0..C) and out[C..2C).
std::vector<double> total(const std::vector<double>& part, int64_t tasks, int64_t C) {
  const int64_t Cp = padded_c(C);
  std::vector<double> out(static_cast<size_t>(2 * C), 0.0);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t c = 0; c < C; ++c) {
      out[c] += part[t * 2 * Cp + c];
      out[C + c] += part[t * 2 * Cp + Cp + c];
    }
  return out;
}

template <class F>
std::vector<F> padded(int64_t C) {
  return std::vector<F>(static_cast<size_t>(padded_c(C)), F(0));
}

// weight / bias as compute-type values (1 / 0 where absent).
template <class F>
void affine_of(const Opt& weight, const Opt& bias, int64_t C, std::vector<F>& w, std::vector<F>& b) {
  w.assign(static_cast<size_t>(C), F(1));
  b.assign(static_cast<size_t>(C), F(0));
  if (weight) std::memcpy(w.data(), weight->data(), C * sizeof(F));
  if (bias) std::memcpy(b.data(), bias->data(), C * sizeof(F));
}

template <class T>
void forward(const CpuArray& x, int64_t N, const Opt& weight, const Opt& bias, double eps, int act, const CpuArray& y,
             const CpuArray& mean, const CpuArray& invstd, const CpuArray& var, const Opt& pooled, int threads) {
  using F = F_of<T>;
  const int64_t M = x.shape(0), C = x.shape(1);
  const Split split(M, N);
  std::vector<F> w, bi;
  affine_of<F>(weight, bias, C, w, bi);
  Rows<T> a{data_of<const T>(x), nullptr, data_of<T>(y), C, {}, act, nullptr, nullptr};
  std::vector<F> shift = padded<F>(C);
  const T* x0 = data_of<const T>(x);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<F>(simd::to_f(x0[c]));
  a.p[0] = shift.data();
  const std::vector<double> s = total(
      run_tasks<T>(a, split, threads, true, [](const Rows<T>& r, int64_t, int64_t r0, int64_t r1) { run_stats(r, r0, r1); }),
      split.tasks, C);
  std::vector<F> sa = padded<F>(C), sb = padded<F>(C);
  F* mean_out = data_of<F>(mean);
  F* invstd_out = data_of<F>(invstd);
  F* var_out = data_of<F>(var);
  for (int64_t c = 0; c < C; ++c) {
    const double d = s[c] / static_cast<double>(M);
    const double v = std::max(s[C + c] / static_cast<double>(M) - d * d, 0.0);
    const double m = static_cast<double>(shift[c]) + d;
    const double is = 1.0 / std::sqrt(v + eps);
    mean_out[c] = static_cast<F>(m);
    var_out[c] = static_cast<F>(v);
    invstd_out[c] = static_cast<F>(is);
    sa[c] = static_cast<F>(static_cast<double>(w[c]) * is);
    sb[c] = static_cast<F>(static_cast<double>(bi[c]) - m * static_cast<double>(w[c]) * is);
  }
  a.p[0] = sa.data();
  a.p[1] = sb.data();
  advise_huge(a.out, M * C * static_cast<int64_t>(sizeof(T)));
  const std::vector<double> part = run_tasks<T>(
      a, split, threads, pooled.has_value(),
      [](const Rows<T>& r, int64_t, int64_t r0, int64_t r1) { run_apply(r, r0, r1); });
  if (pooled) {  // per image, the tasks' sums in order
    const int64_t Cp = padded_c(C);
    F* out = data_of<F>(*pooled);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        double t = 0;
        for (int64_t k = n * split.per_image; k < (n + 1) * split.per_image; ++k) t += part[k * 2 * Cp + c];
        out[n * C + c] = static_cast<F>(t / static_cast<double>(split.HW));
      }
  }
}

template <class T>
void backward(const CpuArray& grad, const CpuArray& x, int64_t N, const Opt& weight, const Opt& bias,
              const CpuArray& mean, const CpuArray& invstd, const Opt& grad_pooled, int act, const CpuArray& grad_x,
              const CpuArray& grad_weight, const CpuArray& grad_bias, int threads) {
  using F = F_of<T>;
  const int64_t M = x.shape(0), C = x.shape(1), Cp = padded_c(C);
  const Split split(M, N);
  std::vector<F> w, bi;
  affine_of<F>(weight, bias, C, w, bi);
  const F* mu = data_of<const F>(mean);
  const F* is = data_of<const F>(invstd);
  std::vector<F> sa = padded<F>(C), sb = padded<F>(C), sm = padded<F>(C), sp = padded<F>(C), sq = padded<F>(C);
  // dL/dpooled / (H * W), per image (zeros without one): added to dL/dy of each of its pixels
  std::vector<F> gp(static_cast<size_t>(grad_pooled ? N * Cp : Cp), F(0));
  if (grad_pooled) {
    const F* g = data_of<const F>(*grad_pooled);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) gp[n * Cp + c] = static_cast<F>(static_cast<double>(g[n * C + c]) / split.HW);
  }
  for (int64_t c = 0; c < C; ++c) {
    const double k = static_cast<double>(w[c]) * static_cast<double>(is[c]);
    sa[c] = static_cast<F>(k);
    sb[c] = static_cast<F>(static_cast<double>(bi[c]) - static_cast<double>(mu[c]) * k);
    sm[c] = mu[c];
  }
  Rows<T> a{data_of<const T>(x), data_of<const T>(grad), data_of<T>(grad_x), C,
            {sa.data(), sb.data(), sm.data(), nullptr, nullptr, nullptr}, act, nullptr, nullptr};
  const bool per_image = grad_pooled.has_value();
  auto with_image = [&](Rows<T> r, int64_t t) {
    r.p[5] = gp.data() + (per_image ? split.image(t) * Cp : 0);
    return r;
  };
  const std::vector<double> s = total(
      run_tasks<T>(a, split, threads, true,
                   [&](const Rows<T>& r, int64_t t, int64_t r0, int64_t r1) { run_bstats(with_image(r, t), r0, r1); }),
      split.tasks, C);
  F* gw = data_of<F>(grad_weight);
  F* gb = data_of<F>(grad_bias);
  for (int64_t c = 0; c < C; ++c) {
    const double k = static_cast<double>(sa[c]), i = static_cast<double>(is[c]);
    const double sg = s[c] / static_cast<double>(M), sgx = s[C + c] / static_cast<double>(M);
    gw[c] = static_cast<F>(s[C + c] * i);
    gb[c] = static_cast<F>(s[c]);
    sp[c] = static_cast<F>(-k * i * i * sgx);
    sq[c] = static_cast<F>(-k * sg);
  }
  a.p[3] = sp.data();
  a.p[4] = sq.data();
  advise_huge(a.out, M * C * static_cast<int64_t>(sizeof(T)));
  run_tasks<T>(a, split, threads, false,
               [&](const Rows<T>& r, int64_t t, int64_t r0, int64_t r1) { run_bapply(with_image(r, t), r0, r1); });
}

const nb::dlpack::dtype kBF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};

template <class Fn>
void dispatch(const CpuArray& x, const char* op, Fn&& f) {
  if (x.dtype() == nb::dtype<float>()) return f(float{});
  if (x.dtype() == nb::dtype<double>()) return f(double{});
  if (x.dtype() == kBF16) return f(bf16{});
  fail(op, ": x must be float32, float64 or bfloat16 on the CPU, got ", dtype_name(x.dtype()));
}

template <class F>
void check_vector(const CpuArray& v, int64_t C, const char* op, const char* name) {
  check_shape(v, {C}, op, name);
  check_dtype(v, nb::dtype<F>(), op, name);
}

template <class T>
void check_rows(const CpuArray& a, const CpuArray& x, const char* op, const char* name) {
  check_shape(a, {static_cast<int64_t>(x.shape(0)), static_cast<int64_t>(x.shape(1))}, op, name);
  check(a.dtype() == x.dtype(), op, ": ", name, " must have x's dtype ", dtype_name(x.dtype()), ", got ",
        dtype_name(a.dtype()));
}

void check_x(const CpuArray& x, int64_t images, int act, const char* op) {
  check(x.ndim() == 2, op, ": x must be [rows, channels] (NHWC rows)");
  check(x.shape(0) >= 1 && x.shape(1) >= 1, op, ": x must have at least one row and one channel");
  check(images >= 1 && static_cast<int64_t>(x.shape(0)) % images == 0, op,
        ": images must be >= 1 and divide the rows (N * H * W rows of N images)");
  check(static_cast<int64_t>(x.shape(0)) <= kMaxSize * 16 && static_cast<int64_t>(x.shape(1)) <= kMaxSize, op,
        ": x is too large");
  check(act >= simd::kNone && act <= simd::kSigmoid, op, ": unknown activation code ", act);
}

}  // namespace

void bn_act_forward_api(const CpuArray& x, int64_t images, const Opt& weight, const Opt& bias, double eps, int act,
                        const CpuArray& y, const CpuArray& mean, const CpuArray& invstd, const CpuArray& var,
                        const Opt& pooled, int threads) {
  const char* op = "bn_act_forward";
  check_x(x, images, act, op);
  check(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0");
  const int64_t C = x.shape(1);
  dispatch(x, op, [&](auto t) {
    using T = decltype(t);
    using F = F_of<T>;
    check_rows<T>(y, x, op, "y");
    if (weight) check_vector<F>(*weight, C, op, "weight");
    if (bias) check_vector<F>(*bias, C, op, "bias");
    check_vector<F>(mean, C, op, "mean");
    check_vector<F>(invstd, C, op, "invstd");
    check_vector<F>(var, C, op, "var");
    if (pooled) {
      check_shape(*pooled, {images, C}, op, "pooled");
      check_dtype(*pooled, nb::dtype<F>(), op, "pooled");
    }
    forward<T>(x, images, weight, bias, eps, act, y, mean, invstd, var, pooled, threads);
  });
}

void bn_act_backward_api(const CpuArray& grad, const CpuArray& x, int64_t images, const Opt& weight, const Opt& bias,
                         const CpuArray& mean, const CpuArray& invstd, const Opt& grad_pooled, int act,
                         const CpuArray& grad_x, const CpuArray& grad_weight, const CpuArray& grad_bias, int threads) {
  const char* op = "bn_act_backward";
  check_x(x, images, act, op);
  const int64_t C = x.shape(1);
  dispatch(x, op, [&](auto t) {
    using T = decltype(t);
    using F = F_of<T>;
    check_rows<T>(grad, x, op, "grad");
    check_rows<T>(grad_x, x, op, "grad_x");
    if (weight) check_vector<F>(*weight, C, op, "weight");
    if (bias) check_vector<F>(*bias, C, op, "bias");
    check_vector<F>(mean, C, op, "mean");
    check_vector<F>(invstd, C, op, "invstd");
    check_vector<F>(grad_weight, C, op, "grad_weight");
    check_vector<F>(grad_bias, C, op, "grad_bias");
    if (grad_pooled) {
      check_shape(*grad_pooled, {images, C}, op, "grad_pooled");
      check_dtype(*grad_pooled, nb::dtype<F>(), op, "grad_pooled");
    }
    backward<T>(grad, x, images, weight, bias, mean, invstd, grad_pooled, act, grad_x, grad_weight, grad_bias, threads);
  });
}

}  // namespace effops::norm
