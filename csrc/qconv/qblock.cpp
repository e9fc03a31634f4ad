// QBlockPlan (qblock_api.h): one int8 MBConv block per call, on the kernels of qdw.cpp /
// qpw.cpp / qse.cpp in the order and with the arguments of the op-by-op path
// (effops.compress._qmodules.QMBConv), so its codes are those of that path bit for bit. What
// the block saves is the Python between the ops: four op calls with their argument checks and
// conversions (~100 us per block at batch 1) become one.
#include "qconv/qblock_api.h"

#include <cmath>
#include <memory>
#include <tuple>

#include "qconv/qconv_checks.h"

namespace effops::qconv {
namespace {

using qconv_checks::check_code;
using qconv_checks::kMaxReduction;

// This thread's intermediates of run(): grown as needed, never shrunk (q_release_scratch frees
// them); uninitialised memory (every byte is written before it is read).
struct Scratch {
  template <class T>
  struct Buf {
    std::unique_ptr<T[]> p;
    size_t n = 0;
    T* get(size_t want) {
      if (want > n) {
        p.reset();
        p.reset(new T[want]);
        n = want;
      }
      return p.get();
    }
  };
  Buf<uint8_t> expanded, depthwise;
  Buf<int32_t> sums;
  Buf<float> gates;
};
thread_local Scratch scratch;

void check_cfg(const std::vector<int64_t>& cfg, const char* op, const char* name) {
  check(cfg.size() == 4, op, ": ", name, " must be [zp, qmin, qmax, out_zp], got ", cfg.size(), " values");
  check_code(cfg[3], op, "out_zp");
}

Epilogue epilogue(const Opt& bias, const CpuArray& mult, const Opt& lut, int64_t C, const std::vector<int64_t>& cfg,
                  const char* op, const char* prefix) {
  return qconv_checks::epilogue_of<Epilogue>(bias, mult, lut, C, cfg[0], cfg[1], cfg[2], op, prefix);
}

}  // namespace

QBlockPlan::QBlockPlan(int64_t x_zp, Opt expand_w, Opt expand_bias, Opt expand_mult, Opt expand_lut,
                       Opt expand_packed, std::vector<int64_t> expand_cfg, CpuArray taps, Opt dw_bias, CpuArray dw_mult,
                       Opt dw_lut, std::vector<int64_t> dw_cfg, std::vector<int64_t> stride, Opt se_w1, Opt se_b1,
                       int se_act, Opt se_w2, Opt se_b2, int se_gate, double dw_scale, CpuArray project_w,
                       Opt project_bias, CpuArray project_mult, Opt project_lut, Opt project_packed,
                       std::vector<int64_t> project_cfg, bool residual, double res_mult) {
  const char* op = "QBlockPlan";
  check_code(x_zp, op, "x_zp");
  x_zp_ = static_cast<int32_t>(x_zp);
  check(taps.ndim() == 3, op, ": taps must be [C, KH, KW]");
  check_dtype(taps, nb::dtype<int8_t>(), op, "taps");
  C_ = taps.shape(0), KH_ = taps.shape(1), KW_ = taps.shape(2);
  check(C_ >= 1 && C_ <= kMaxReduction, op, ": the block needs 1..", kMaxReduction, " channels, got ", C_);
  check(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1 && stride[0] <= kMaxSize && stride[1] <= kMaxSize, op,
        ": stride must be 2 values in [1, ", kMaxSize, "]");
  stride_ = stride;
  expand_ = expand_w.has_value();
  if (expand_) {
    check(expand_w->ndim() == 2, op, ": expand_w must be [C, Cin]");
    check_dtype(*expand_w, nb::dtype<int8_t>(), op, "expand_w");
    check(expand_mult.has_value(), op, ": expand_mult is required with expand_w");
    Cin_ = expand_w->shape(1);
    check_shape(*expand_w, {C_, Cin_}, op, "expand_w");
    check(Cin_ >= 1 && Cin_ <= kMaxReduction, op, ": expand_w must have 1..", kMaxReduction, " input channels");
    check_cfg(expand_cfg, op, "expand_cfg");
    ee_ = epilogue(expand_bias, *expand_mult, expand_lut, C_, expand_cfg, op, "expand_");
    h_zp_ = static_cast<int32_t>(expand_cfg[3]);
    ew_ = data_of<const int8_t>(*expand_w);
    std::tie(eblob_, eblob_n_) = packed_blob(expand_packed, op, "expand_packed");
  } else {
    check(!expand_bias && !expand_mult && !expand_lut && !expand_packed, op,
          ": expand_bias / expand_mult / expand_lut / expand_packed need expand_w");
    Cin_ = C_;
    h_zp_ = x_zp_;
  }
  check_cfg(dw_cfg, op, "dw_cfg");
  de_ = epilogue(dw_bias, dw_mult, dw_lut, C_, dw_cfg, op, "dw_");
  mid_zp_ = static_cast<int32_t>(dw_cfg[3]);
  taps_ = data_of<const int8_t>(taps);
  se_ = se_w1.has_value();
  check(se_ == se_w2.has_value(), op, ": se_w1 and se_w2 go together");
  check(se_ || (!se_b1 && !se_b2), op, ": se_b1 / se_b2 need se_w1 and se_w2");
  if (se_) {
    const SeArgs a = se_args_of(C_, *se_w1, se_b1, se_act, *se_w2, se_b2, se_gate, op);
    w1_ = a.w1, b1_ = a.b1, w2_ = a.w2, b2_ = a.b2, R_ = a.R, se_act_ = a.act, se_gate_ = a.gate;
    check(std::isfinite(dw_scale), op, ": dw_scale must be finite");
    dw_scale_ = static_cast<float>(dw_scale);  // as q_se_gates converts its scale
  }
  check(project_w.ndim() == 2, op, ": project_w must be [Co, C]");
  check_dtype(project_w, nb::dtype<int8_t>(), op, "project_w");
  Co_ = project_w.shape(0);
  check_shape(project_w, {Co_, C_}, op, "project_w");
  check(Co_ >= 1, op, ": project_w needs >= 1 output channel");
  check_cfg(project_cfg, op, "project_cfg");
  pe_ = epilogue(project_bias, project_mult, project_lut, Co_, project_cfg, op, "");
  pw_ = data_of<const int8_t>(project_w);
  std::tie(pblob_, pblob_n_) = packed_blob(project_packed, op, "project_packed");
  residual_ = residual;
  if (residual_) {
    check(Co_ == Cin_, op, ": a residual needs as many output channels as input ones (", Co_, " vs ", Cin_, ")");
    check(!pe_.lut, op, ": a residual cannot be combined with a lut");
    check(std::isfinite(res_mult), op, ": res_mult must be finite");
    res_mult_ = static_cast<float>(res_mult);
  }
  for (const Opt* a : {&expand_w, &expand_bias, &expand_mult, &expand_lut, &expand_packed, &dw_bias, &dw_lut, &se_w1,
                       &se_b1, &se_w2, &se_b2, &project_bias, &project_lut, &project_packed})
    if (*a) arrays_.push_back(*a);
  for (const CpuArray* a : {&taps, &dw_mult, &project_w, &project_mult}) arrays_.push_back(*a);
}

std::vector<int64_t> QBlockPlan::output_hw(int64_t H, int64_t W, const std::vector<int64_t>& pad) const {
  DwGeom g{};
  g.N = 1, g.H = H, g.W = W, g.C = C_, g.KH = KH_, g.KW = KW_;
  qconv_checks::conv_output(g, stride_, pad, "QBlockPlan.output_hw");
  return {g.Ho, g.Wo};
}

void QBlockPlan::run(const CpuArray& x, const CpuArray& out, const std::vector<int64_t>& pad, int threads) const {
  const char* op = "QBlockPlan.run";
  check(x.ndim() == 4, op, ": x must be NHWC [N, H, W, Cin]");
  check_dtype(x, nb::dtype<uint8_t>(), op, "x");
  DwGeom g{};
  g.N = x.shape(0), g.H = x.shape(1), g.W = x.shape(2), g.C = C_, g.KH = KH_, g.KW = KW_;
  check_shape(x, {g.N, g.H, g.W, Cin_}, op, "x");
  qconv_checks::conv_output(g, stride_, pad, op);
  qconv_checks::u8_output(out, {g.N, g.Ho, g.Wo, Co_}, op);
  check(g.Ho * g.Wo <= (int64_t{1} << 31) / 256, op, ": too many output pixels for int32 channel sums");
  check(!residual_ || (g.Ho == g.H && g.Wo == g.W), op, ": a residual needs the output as large as the input");
  const uint8_t* xp = data_of<const uint8_t>(x);
  uint8_t* o = data_of<uint8_t>(out);
  const Residual res = residual_ ? Residual{xp, x_zp_, res_mult_} : Residual{nullptr, 0, 1.0f};
  const uint8_t* h = xp;
  if (expand_) {
    uint8_t* hb = scratch.expanded.get(static_cast<size_t>(g.N * g.H * g.W * C_));
    q_pw(xp, ew_, g.N, g.H * g.W, Cin_, C_, x_zp_, nullptr, ee_, Residual{nullptr, 0, 1.0f}, hb, threads, eblob_,
         eblob_n_);
    h = hb;
  }
  if (!se_) {
    q_dwsep(h, taps_, g, h_zp_, de_, mid_zp_, pw_, Co_, pe_, res, o, threads, pblob_, pblob_n_);
    return;
  }
  const int64_t hw = g.Ho * g.Wo;
  uint8_t* y = scratch.depthwise.get(static_cast<size_t>(g.N * hw * C_));
  int32_t* sums = scratch.sums.get(static_cast<size_t>(g.N * C_));
  float* gates = scratch.gates.get(static_cast<size_t>(g.N * C_));
  q_dw(h, taps_, g, h_zp_, de_, y, sums, threads);
  se_gates(sums, g.N, C_, hw, mid_zp_, dw_scale_, w1_, b1_, R_, se_act_, w2_, b2_, se_gate_, gates);
  q_pw(y, pw_, g.N, hw, C_, Co_, mid_zp_, gates, pe_, res, o, threads, pblob_, pblob_n_);
}

void q_release_scratch() { scratch = Scratch{}; }

}  // namespace effops::qconv
