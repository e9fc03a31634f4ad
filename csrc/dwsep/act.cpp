// act_inplace: an activation applied in place over a dense float32 buffer, with the SIMD
// activations of the fused kernels (simd::act_v), per ISA level, in parallel chunks. Used where a
// network's stem conv is torch's (oneDNN) and its activation follows as a separate pass: torch's
// SiLU there took 7.7 ms of efficientnet_b0's 327 ms at batch 8 on an AVX2 Zen 1 (about 5 cycles
// per element), the epilogue SiLU of the GEMMs about 2.
#include <algorithm>

#include "common/errors.h"
#include "common/isa.h"
#include "common/parallel.h"
#include "dwsep/dwsep_api.h"
#include "dwsep/simd.h"

namespace effops::dwsep {
namespace {

template <int W, int ACT>
EFFOPS_INLINE void act_span(float* p, int64_t n) {
  using V = typename simd::Traits<float, W>::V;
  constexpr int64_t L = simd::Traits<float, W>::L;
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {  // two independent chains per iteration
    const V a = simd::loadv<V>(p + i), b = simd::loadv<V>(p + i + L);
    simd::storev(p + i, simd::act_v(a, ACT));
    simd::storev(p + i + L, simd::act_v(b, ACT));
  }
  for (; i + L <= n; i += L) simd::storev(p + i, simd::act_v(simd::loadv<V>(p + i), ACT));
  for (; i < n; ++i) p[i] = simd::act_s(p[i], ACT);
}

template <int W>
EFFOPS_INLINE void act_body(float* p, int64_t n, int act) {
  switch (act) {
    case simd::kRelu: return act_span<W, simd::kRelu>(p, n);
    case simd::kRelu6: return act_span<W, simd::kRelu6>(p, n);
    case simd::kSilu: return act_span<W, simd::kSilu>(p, n);
    case simd::kHardswish: return act_span<W, simd::kHardswish>(p, n);
    case simd::kSigmoid: return act_span<W, simd::kSigmoid>(p, n);
    default: return;
  }
}

EFFOPS_ISA_DISPATCH_W(act_chunk, act_body, (float* p, int64_t n, int act), (p, n, act))

}  // namespace

void act_inplace_api(const CpuArray& x, int act, int threads) {
  const char* op = "act_inplace";
  check(x.ndim() == 1, op, ": x must be a 1-d array (a tensor's dense storage)");
  check_dtype(x, nb::dtype<float>(), op, "x");
  check(act >= simd::kNone && act <= simd::kSigmoid, op, ": unknown activation code ", act);
  float* p = data_of<float>(x);
  const int64_t n = static_cast<int64_t>(x.shape(0));
  if (act == simd::kNone || n == 0) return;
  constexpr int64_t kChunk = 1 << 15;  // elements per task (128 kB: a task's span stays in L2)
  parallel_for((n + kChunk - 1) / kChunk, threads, [&](int64_t t, int) {
    const int64_t i0 = t * kChunk;
    act_chunk(p + i0, std::min(kChunk, n - i0), act);
  });
}

}  // namespace effops::dwsep
