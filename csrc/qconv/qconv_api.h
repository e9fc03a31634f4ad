// Array-level entry points of the int8 convolutions (checked shapes/dtypes). NHWC uint8
// activations; see python/effops/ops/qconv.py for the arithmetic.
#pragma once
#include <optional>
#include <utility>
#include <vector>

#include "common/ndarray.h"

namespace effops::qconv {

using Opt = std::optional<CpuArray>;

void q_dw_forward_api(const CpuArray& x, const CpuArray& taps, Opt bias, const CpuArray& mult, Opt lut,
                      const std::vector<int64_t>& stride, const std::vector<int64_t>& pad, int64_t x_zp,
                      int64_t out_zp, int64_t qmin, int64_t qmax, const CpuArray& y, const CpuArray& sums,
                      int threads);
void q_pw_forward_api(const CpuArray& x, const CpuArray& w, Opt bias, const CpuArray& mult, Opt lut, Opt gate,
                      Opt residual, int64_t x_zp, int64_t out_zp, int64_t qmin, int64_t qmax, int64_t res_zp,
                      double res_mult, const CpuArray& out, Opt packed, int threads);
// A dense conv (the stem): x [N, H, W, C] uint8, w [Co, Kp] int8 (the taps in (kh, kw, c) order,
// then zeros: KH * KW * C <= Kp <= that rounded up to 4), out [N, Ho, Wo, Co]; packed: q_pw_pack
// of w or none.
void q_conv_forward_api(const CpuArray& x, const CpuArray& w, int64_t KH, int64_t KW, Opt bias, const CpuArray& mult,
                        Opt lut, const std::vector<int64_t>& stride, const std::vector<int64_t>& pad, int64_t x_zp,
                        int64_t out_zp, int64_t qmin, int64_t qmax, const CpuArray& out, Opt packed, int threads);
void q_dwsep_forward_api(const CpuArray& x, const CpuArray& taps, Opt dw_bias, const CpuArray& dw_mult, Opt dw_lut,
                         const CpuArray& pw, Opt pw_bias, const CpuArray& pw_mult, Opt lut, Opt residual,
                         const std::vector<int64_t>& stride, const std::vector<int64_t>& pad, int64_t x_zp,
                         int64_t dw_zp, int64_t mid_qmin, int64_t mid_qmax, int64_t mid_zp, int64_t out_zp, int64_t qmin,
                         int64_t qmax, int64_t res_zp, double res_mult, const CpuArray& out, Opt pw_packed,
                         int threads);

// The int8 BiFPN fusion (python/effops/ops/qconv_fuse.py); modes 0 identity, 1 nearest,
// 2 maxpool (TF same), 3 maxpool_sym.
void q_fuse_forward_api(const std::vector<CpuArray>& inputs, const std::vector<int64_t>& zps,
                        const std::vector<int64_t>& mults, const std::vector<int>& modes, int64_t out_zp,
                        int64_t qmin, int64_t qmax, Opt lut, const CpuArray& out, int threads);

// A q_pw_pack blob argument (named `name` in errors): uint8, one dimension (its header is validated
// by the kernels), as (data, bytes); none: (null, 0).
std::pair<const uint8_t*, int64_t> packed_blob(const Opt& b, const char* op, const char* name);

// The pointwise weights packed once for the current level (the kernels use a blob made for their
// level, shape, zero point and bias presence, and pack per call otherwise): blob [q_pw_packed_bytes].
int64_t q_pw_packed_bytes(int64_t Co, int64_t K);
void q_pw_pack_api(const CpuArray& w, Opt bias, int64_t x_zp, const CpuArray& blob);

// Float32 -> uint8 codes, q = clamp(rne(x / scale) + zp, 0, 255), over x's dense storage (qquant.cpp).
void q_quantize_api(const CpuArray& x, const CpuArray& out, double scale, int64_t zp, int threads);

// The checked SE MLP arguments of C channels (qse.cpp): w1 [R, C], b1 [R], w2 [C, R], b2 [C] float32,
// act an activation code, gate 5 (sigmoid) or 6 (hard sigmoid).
struct SeArgs {
  const float *w1, *b1, *w2, *b2;
  int64_t R;
  int act, gate;
};
SeArgs se_args_of(int64_t C, const CpuArray& w1, const Opt& b1, int act, const CpuArray& w2, const Opt& b2, int gate,
                  const char* op);
// SE gates [N, C] float32 from the int32 channel sums of a depthwise output (qse.cpp).
void q_se_gates_api(const CpuArray& sums, int64_t hw, int64_t zp, double scale, const CpuArray& w1, Opt b1, int act,
                    const CpuArray& w2, Opt b2, int gate, const CpuArray& out);

// The level the int8 kernels run at now: "avx512-vnni", "avx-vnni", "avx2" or "scalar".
const char* q_isa_name();

}  // namespace effops::qconv
