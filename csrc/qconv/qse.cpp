// Squeeze-excite gates of a quantized block from the depthwise output's channel sums
// (python/effops/ops/qconv.py q_se_gates defines them): the means in float32 exactly as the
// torch expression (float(sums) / hw - zp) * scale, then the MLP in float32 - hidden[j] =
// act(dot(w1[j], means) + b1[j]), gate[c] = g(dot(w2[c], hidden) + b2[c]), dot products summed
// in a fixed order (simd::dot8) - and g sigmoid or hard sigmoid (relu6(v + 3) / 6). One call per
// block instead of ~11 torch ops (~40 us at batch 1).
#include <algorithm>
#include <cmath>
#include <vector>

#include "dwsep/simd.h"
#include "qconv/qconv.h"
#include "qconv/qconv_api.h"

namespace effops::qconv {
namespace {

const float* opt_vec(const Opt& v, int64_t n, const char* op, const char* name) {
  if (!v) return nullptr;
  check_shape(*v, {n}, op, name);
  check_dtype(*v, nb::dtype<float>(), op, name);
  return data_of<const float>(*v);
}

}  // namespace

SeArgs se_args_of(int64_t C, const CpuArray& w1, const Opt& b1, int act, const CpuArray& w2, const Opt& b2, int gate,
                  const char* op) {
  check(w1.ndim() == 2 && static_cast<int64_t>(w1.shape(1)) == C, op, ": w1 must be [R, C] with C = ", C);
  check_dtype(w1, nb::dtype<float>(), op, "w1");
  SeArgs a{};
  a.R = w1.shape(0);
  check(a.R >= 1, op, ": w1 must have >= 1 row");
  check_shape(w2, {C, a.R}, op, "w2");
  check_dtype(w2, nb::dtype<float>(), op, "w2");
  check(act >= simd::kNone && act <= simd::kSigmoid, op, ": act must be an activation code 0..5, got ", act);
  check(gate == kGateSigmoid || gate == kGateHardSigmoid, op, ": gate must be 5 (sigmoid) or 6 (hard sigmoid), got ",
        gate);
  a.w1 = data_of<const float>(w1), a.w2 = data_of<const float>(w2);
  a.b1 = opt_vec(b1, a.R, op, "b1"), a.b2 = opt_vec(b2, C, op, "b2");
  a.act = act, a.gate = gate;
  return a;
}

void q_se_gates_api(const CpuArray& sums, int64_t hw, int64_t zp, double scale, const CpuArray& w1, Opt b1, int act,
                    const CpuArray& w2, Opt b2, int gate, const CpuArray& out) {
  const char* op = "q_se_gates";
  check(sums.ndim() == 2, op, ": sums must be [N, C]");
  check_dtype(sums, nb::dtype<int32_t>(), op, "sums");
  const int64_t N = sums.shape(0), C = sums.shape(1);
  const SeArgs a = se_args_of(C, w1, b1, act, w2, b2, gate, op);
  check_shape(out, {N, C}, op, "out");
  check_dtype(out, nb::dtype<float>(), op, "out");
  check(hw >= 1, op, ": hw must be >= 1, got ", hw);
  se_gates(data_of<const int32_t>(sums), N, C, hw, zp, scale, a.w1, a.b1, a.R, a.act, a.w2, a.b2, a.gate,
           data_of<float>(out));
}

void se_gates(const int32_t* s, int64_t N, int64_t C, int64_t hw, int64_t zp, double scale, const float* p1,
              const float* pb1, int64_t R, int act, const float* p2, const float* pb2, int gate, float* g) {
  const float fhw = static_cast<float>(hw), fzp = static_cast<float>(zp), fs = static_cast<float>(scale);
  std::vector<float> means(static_cast<size_t>(C)), hidden(static_cast<size_t>(R));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const float q = static_cast<float>(s[n * C + c]) / fhw;  // one IEEE operation per line: no contraction
      const float d = q - fzp;
      means[static_cast<size_t>(c)] = d * fs;
    }
    for (int64_t j = 0; j < R; ++j)
      hidden[static_cast<size_t>(j)] =
          simd::act_s(simd::dot8(p1 + j * C, means.data(), C) + (pb1 ? pb1[j] : 0.0f), act);
    for (int64_t c = 0; c < C; ++c) {
      const float v = simd::dot8(p2 + c * R, hidden.data(), R) + (pb2 ? pb2[c] : 0.0f);
      g[n * C + c] = gate == kGateHardSigmoid ? std::min(std::max(v + 3.0f, 0.0f), 6.0f) / 6.0f
                                              : simd::act_s(v, simd::kSigmoid);
    }
  }
}

}  // namespace effops::qconv
