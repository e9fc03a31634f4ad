// A whole int8 inverted-residual block in one call (qblock.cpp): the kernel arguments of one
// effops.compress QMBConv, checked and kept once by python/effops/compress/_qmodules.py, and
// run() chaining the same kernels the op-by-op path calls - [expand q_pw] -> q_dw (+ channel
// sums) -> [SE gates] -> projection q_pw (gates, residual), or [expand] -> q_dwsep without SE -
// so the codes are bit-identical to that path. The block's intermediates (expanded map,
// depthwise output, sums, gates) live in reused per-thread buffers.
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "common/ndarray.h"
#include "qconv/qconv.h"
#include "qconv/qconv_api.h"

namespace effops::qconv {

// The arrays are kept referenced (and read in place) for the plan's lifetime. Per stage: int8
// weights ([Co, C]; taps [C, KH, KW]), int32 bias, float32 mult, uint8 lut, the epilogue's zero
// point / clamp, and for the 1x1 stages the q_pw_pack blob (or none). h_zp: the expanded codes'
// zero point (the expand stage's output one); mid_zp: the depthwise codes' zero point the
// projection reads (the depthwise output's). SE: float32 w1 [R, C], w2 [C, R] (the act and gate
// codes of q_se_gates), the means from the depthwise sums at (mid_zp, dw_scale). residual: add
// the input codes (at x_zp, times res_mult) to the projection.
class QBlockPlan {
 public:
  QBlockPlan(int64_t x_zp, Opt expand_w, Opt expand_bias, Opt expand_mult, Opt expand_lut, Opt expand_packed,
             std::vector<int64_t> expand_cfg, CpuArray taps, Opt dw_bias, CpuArray dw_mult, Opt dw_lut,
             std::vector<int64_t> dw_cfg, std::vector<int64_t> stride, Opt se_w1, Opt se_b1, int se_act, Opt se_w2,
             Opt se_b2, int se_gate, double dw_scale, CpuArray project_w, Opt project_bias, CpuArray project_mult,
             Opt project_lut, Opt project_packed, std::vector<int64_t> project_cfg, bool residual, double res_mult);

  // x [N, H, W, Cin] uint8 codes (at x_zp), out [N, Ho, Wo, Co] uint8; pad: top, bottom, left,
  // right of the depthwise conv.
  void run(const CpuArray& x, const CpuArray& out, const std::vector<int64_t>& pad, int threads) const;
  // [Ho, Wo] of an H x W input with these pads (the output run() needs).
  std::vector<int64_t> output_hw(int64_t H, int64_t W, const std::vector<int64_t>& pad) const;

 private:
  std::vector<Opt> arrays_;  // keeps every array alive
  int32_t x_zp_ = 0, h_zp_ = 0, mid_zp_ = 0;
  bool expand_ = false, residual_ = false;
  Epilogue ee_{}, de_{}, pe_{};
  const int8_t *ew_ = nullptr, *taps_ = nullptr, *pw_ = nullptr;
  const uint8_t *eblob_ = nullptr, *pblob_ = nullptr;
  int64_t eblob_n_ = 0, pblob_n_ = 0;
  int64_t Cin_ = 0, C_ = 0, Co_ = 0, KH_ = 0, KW_ = 0, R_ = 0;
  std::vector<int64_t> stride_;
  const float *w1_ = nullptr, *b1_ = nullptr, *w2_ = nullptr, *b2_ = nullptr;
  int se_act_ = 0, se_gate_ = 0;
  bool se_ = false;
  float dw_scale_ = 1.0f, res_mult_ = 1.0f;
};

// Free this thread's reused buffers of QBlockPlan::run (made again at the next call).
void q_release_scratch();

}  // namespace effops::qconv
