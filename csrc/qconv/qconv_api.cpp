#include "qconv/qconv_api.h"

#include "qconv/qconv.h"
#include "qconv/qconv_checks.h"
#include "qconv/qcore.h"

namespace effops::qconv {

std::pair<const uint8_t*, int64_t> packed_blob(const Opt& b, const char* op, const char* name) {
  if (!b) return {nullptr, 0};
  check(b->ndim() == 1, op, ": ", name, " must be a 1-d uint8 array");
  check_dtype(*b, nb::dtype<uint8_t>(), op, name);
  return {data_of<const uint8_t>(*b), static_cast<int64_t>(b->shape(0))};
}

namespace {

using qconv_checks::check_code;
using qconv_checks::kMaxReduction;

Epilogue epilogue(Opt& bias, const CpuArray& mult, Opt& lut, int64_t C, int64_t zp, int64_t qmin, int64_t qmax,
                  const char* op, const char* prefix) {
  return qconv_checks::epilogue_of<Epilogue>(bias, mult, lut, C, zp, qmin, qmax, op, prefix);
}

Residual residual_of(Opt& r, std::initializer_list<int64_t> shape, int64_t zp, double mult, const Epilogue& e,
                     const char* op) {
  const uint8_t* codes = qconv_checks::residual_of(r, shape, zp, mult, e.lut != nullptr, op);
  if (!codes) return Residual{nullptr, 0, 1.0f};
  return Residual{codes, static_cast<int32_t>(zp), static_cast<float>(mult)};
}

// x [N, H, W, C] uint8, taps [C, KH, KW] int8 (this backend's layout), stride and padding.
DwGeom geometry(const CpuArray& x, const CpuArray& taps, const std::vector<int64_t>& stride,
                const std::vector<int64_t>& pad, const char* op) {
  check(x.ndim() == 4, op, ": x must be NHWC [N, H, W, C]");
  check_dtype(x, nb::dtype<uint8_t>(), op, "x");
  check(taps.ndim() == 3, op, ": taps must be [C, KH, KW]");
  check_dtype(taps, nb::dtype<int8_t>(), op, "taps");
  DwGeom g{};
  g.N = x.shape(0), g.H = x.shape(1), g.W = x.shape(2), g.C = x.shape(3);
  g.KH = taps.shape(1), g.KW = taps.shape(2);
  check_shape(taps, {g.C, g.KH, g.KW}, op, "taps");
  qconv_checks::conv_output(g, stride, pad, op);
  return g;
}

}  // namespace

void q_dw_forward_api(const CpuArray& x, const CpuArray& taps, Opt bias, const CpuArray& mult, Opt lut,
                      const std::vector<int64_t>& stride, const std::vector<int64_t>& pad, int64_t x_zp,
                      int64_t out_zp, int64_t qmin, int64_t qmax, const CpuArray& y, const CpuArray& sums,
                      int threads) {
  const char* op = "q_dw_forward";
  const DwGeom g = geometry(x, taps, stride, pad, op);
  check_code(x_zp, op, "x_zp");
  const Epilogue e = epilogue(bias, mult, lut, g.C, out_zp, qmin, qmax, op, "");
  qconv_checks::dw_outputs(y, sums, g, op);
  check(g.Ho * g.Wo <= (int64_t{1} << 31) / 256, op, ": too many output pixels for int32 channel sums");
  q_dw(data_of<const uint8_t>(x), data_of<const int8_t>(taps), g, static_cast<int32_t>(x_zp), e,
       data_of<uint8_t>(y), data_of<int32_t>(sums), threads);
}

void q_pw_forward_api(const CpuArray& x, const CpuArray& w, Opt bias, const CpuArray& mult, Opt lut, Opt gate,
                      Opt residual, int64_t x_zp, int64_t out_zp, int64_t qmin, int64_t qmax, int64_t res_zp,
                      double res_mult, const CpuArray& out, Opt packed, int threads) {
  const char* op = "q_pw_forward";
  const auto [N, H, W, C, Co, g] = qconv_checks::pw_inputs(x, w, gate, op);
  check_code(x_zp, op, "x_zp");
  const Epilogue e = epilogue(bias, mult, lut, Co, out_zp, qmin, qmax, op, "");
  const Residual res = residual_of(residual, {N, H, W, Co}, res_zp, res_mult, e, op);
  qconv_checks::u8_output(out, {N, H, W, Co}, op);
  const auto blob = packed_blob(packed, op, "packed");
  q_pw(data_of<const uint8_t>(x), data_of<const int8_t>(w), N, H * W, C, Co, static_cast<int32_t>(x_zp), g, e, res,
       data_of<uint8_t>(out), threads, blob.first, blob.second);
}

void q_conv_forward_api(const CpuArray& x, const CpuArray& w, int64_t KH, int64_t KW, Opt bias, const CpuArray& mult,
                        Opt lut, const std::vector<int64_t>& stride, const std::vector<int64_t>& pad, int64_t x_zp,
                        int64_t out_zp, int64_t qmin, int64_t qmax, const CpuArray& out, Opt packed, int threads) {
  const char* op = "q_conv_forward";
  check(x.ndim() == 4, op, ": x must be NHWC [N, H, W, C]");
  check_dtype(x, nb::dtype<uint8_t>(), op, "x");
  check(w.ndim() == 2, op, ": w must be [Co, Kp] (the taps in (kh, kw, c) order, zero-padded)");
  check_dtype(w, nb::dtype<int8_t>(), op, "w");
  DwGeom g{};
  g.N = x.shape(0), g.H = x.shape(1), g.W = x.shape(2), g.C = x.shape(3), g.KH = KH, g.KW = KW;
  check(g.C >= 1 && KH >= 1 && KW >= 1 && KH * KW * g.C <= kMaxReduction, op, ": the patch (KH * KW * C) must have 1..",
        kMaxReduction, " codes");
  const int64_t Co = w.shape(0), K = KH * KW * g.C, Kp = w.shape(1);
  check(Co >= 1 && Kp >= K && Kp <= detail::round_up(K, 4), op, ": w must be [Co, Kp] with KH * KW * C = ", K,
        " <= Kp <= ", detail::round_up(K, 4), " (the taps, then zero weights), got [", Co, ", ", Kp, "]");
  qconv_checks::conv_output(g, stride, pad, op);
  check_code(x_zp, op, "x_zp");
  const Epilogue e = epilogue(bias, mult, lut, Co, out_zp, qmin, qmax, op, "");
  qconv_checks::u8_output(out, {g.N, g.Ho, g.Wo, Co}, op);
  const auto blob = packed_blob(packed, op, "packed");
  q_conv(data_of<const uint8_t>(x), data_of<const int8_t>(w), g, Co, Kp, static_cast<int32_t>(x_zp), e,
         data_of<uint8_t>(out), threads, blob.first, blob.second);
}

void q_dwsep_forward_api(const CpuArray& x, const CpuArray& taps, Opt dw_bias, const CpuArray& dw_mult, Opt dw_lut,
                         const CpuArray& pw, Opt pw_bias, const CpuArray& pw_mult, Opt lut, Opt residual,
                         const std::vector<int64_t>& stride, const std::vector<int64_t>& pad, int64_t x_zp,
                         int64_t dw_zp, int64_t mid_qmin, int64_t mid_qmax, int64_t mid_zp, int64_t out_zp, int64_t qmin,
                         int64_t qmax, int64_t res_zp, double res_mult, const CpuArray& out, Opt pw_packed,
                         int threads) {
  const char* op = "q_dwsep_forward";
  const DwGeom g = geometry(x, taps, stride, pad, op);
  check_code(x_zp, op, "x_zp");
  check(pw.ndim() == 2, op, ": pw must be [Co, C]");
  check_dtype(pw, nb::dtype<int8_t>(), op, "pw");
  const int64_t Co = pw.shape(0);
  check_shape(pw, {Co, g.C}, op, "pw");
  check(g.C <= kMaxReduction && Co >= 1, op, ": need <= ", kMaxReduction, " input and >= 1 output channels");
  const Epilogue mid = epilogue(dw_bias, dw_mult, dw_lut, g.C, dw_zp, mid_qmin, mid_qmax, op, "mid_");
  check_code(mid_zp, op, "mid_zp");
  const Epilogue e = epilogue(pw_bias, pw_mult, lut, Co, out_zp, qmin, qmax, op, "");
  const Residual res = residual_of(residual, {g.N, g.Ho, g.Wo, Co}, res_zp, res_mult, e, op);
  qconv_checks::u8_output(out, {g.N, g.Ho, g.Wo, Co}, op);
  const auto blob = packed_blob(pw_packed, op, "packed");
  q_dwsep(data_of<const uint8_t>(x), data_of<const int8_t>(taps), g, static_cast<int32_t>(x_zp), mid,
          static_cast<int32_t>(mid_zp), data_of<const int8_t>(pw), Co, e, res, data_of<uint8_t>(out), threads,
          blob.first, blob.second);
}

const char* q_isa_name() { return level_name(level()); }

int64_t q_pw_packed_bytes(int64_t Co, int64_t K) {
  check(Co >= 1 && K >= 1 && K <= kMaxReduction && Co <= kMaxSize, "q_pw_packed_bytes: bad shape");
  return detail::blob_bytes(Co, K);
}

void q_pw_pack_api(const CpuArray& w, Opt bias, int64_t x_zp, const CpuArray& blob) {
  const char* op = "q_pw_pack";
  check(w.ndim() == 2, op, ": w must be [Co, C]");
  check_dtype(w, nb::dtype<int8_t>(), op, "w");
  const int64_t Co = w.shape(0), K = w.shape(1);
  check(Co >= 1 && K >= 1 && K <= kMaxReduction, op, ": need 1..", kMaxReduction, " input and >= 1 output channels");
  check_code(x_zp, op, "x_zp");
  const int32_t* b = nullptr;
  if (bias) {
    check_shape(*bias, {Co}, op, "bias");
    check_dtype(*bias, nb::dtype<int32_t>(), op, "bias");
    b = data_of<const int32_t>(*bias);
  }
  check_shape(blob, {detail::blob_bytes(Co, K)}, op, "blob");
  check_dtype(blob, nb::dtype<uint8_t>(), op, "blob");
  detail::pack_blob(level(), data_of<const int8_t>(w), K, Co, static_cast<int32_t>(x_zp), b, data_of<uint8_t>(blob));
}

}  // namespace effops::qconv
