// Int8 BiFPN fusion (q_weighted_fuse; python/effops/ops/qconv_fuse.py defines it): each output
// pixel sums, per channel, (R_i(x_i) - zp_i) * mult_i over its 2-4 inputs in int64 (mult_i a Q16
// fixed-point multiplier), then q = floor((acc + 2^15) / 2^16) + out_zp, clamped, through the
// optional table. R_i selects codes: identity, nearest (ATen's index rule, the ratio in float32)
// or a 3x3 / 2 max pool (TF 'same' or symmetric padding; padding never wins a max).
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/parallel.h"
#include "qconv/qconv_api.h"

namespace effops::qconv {
namespace {

struct In {
  const uint8_t* x;
  int64_t H, W;
  int mode;  // 0 identity, 1 nearest, 2 maxpool (TF same), 3 maxpool_sym
  int32_t zp;
  int64_t mult;
  int64_t pt, pl;
  std::vector<int64_t> sh, sw;  // nearest source rows / columns
};

int64_t nearest_src(int64_t dst, int64_t n_in, int64_t n_out) {
  if (n_in == n_out) return dst;
  const float scale = static_cast<float>(n_in) / static_cast<float>(n_out);
  return std::min<int64_t>(static_cast<int64_t>(std::floor(static_cast<float>(dst) * scale)), n_in - 1);
}

int64_t floor_shift16(int64_t a) { return a >= 0 ? (a >> 16) : -((-a + 65535) >> 16); }

}  // namespace

void q_fuse_forward_api(const std::vector<CpuArray>& inputs, const std::vector<int64_t>& zps,
                        const std::vector<int64_t>& mults, const std::vector<int>& modes, int64_t out_zp,
                        int64_t qmin, int64_t qmax, Opt lut, const CpuArray& out, int threads) {
  const char* op = "q_fuse_forward";
  const size_t k = inputs.size();
  check(k >= 2 && k <= 4 && zps.size() == k && mults.size() == k && modes.size() == k, op,
        ": 2-4 inputs with one zero point, multiplier and mode each");
  check(out.ndim() == 4, op, ": out must be NHWC");
  check_dtype(out, nb::dtype<uint8_t>(), op, "out");
  const int64_t N = out.shape(0), Ho = out.shape(1), Wo = out.shape(2), C = out.shape(3);
  check(out_zp >= 0 && out_zp <= 255 && qmin >= 0 && qmax <= 255 && qmin <= qmax, op,
        ": out_zp, qmin, qmax must be codes with qmin <= qmax");
  const uint8_t* table = nullptr;
  if (lut) {
    check_shape(*lut, {256}, op, "lut");
    check_dtype(*lut, nb::dtype<uint8_t>(), op, "lut");
    table = data_of<const uint8_t>(*lut);
  }
  std::vector<In> ins(k);
  for (size_t i = 0; i < k; ++i) {
    const CpuArray& a = inputs[i];
    check(a.ndim() == 4 && a.shape(0) == static_cast<size_t>(N) && a.shape(3) == static_cast<size_t>(C), op,
          ": inputs must be NHWC with the N and C of out");
    check_dtype(a, nb::dtype<uint8_t>(), op, "inputs");
    check(zps[i] >= 0 && zps[i] <= 255, op, ": zero points must be in [0, 255]");
    check(mults[i] >= -(int64_t{1} << 31) && mults[i] < (int64_t{1} << 31), op, ": multipliers must fit int32");
    check(modes[i] >= 0 && modes[i] <= 3, op, ": bad resample mode");
    In& in = ins[i];
    in.x = data_of<const uint8_t>(a), in.H = a.shape(1), in.W = a.shape(2), in.mode = modes[i];
    in.zp = static_cast<int32_t>(zps[i]), in.mult = mults[i];
    if (in.mode == 0) check(in.H == Ho && in.W == Wo, op, ": an identity input must have the output size");
    if (in.mode == 1) {
      check(in.H >= 1 && in.W >= 1, op, ": empty input");
      for (int64_t d = 0; d < Ho; ++d) in.sh.push_back(nearest_src(d, in.H, Ho));
      for (int64_t d = 0; d < Wo; ++d) in.sw.push_back(nearest_src(d, in.W, Wo));
    }
    if (in.mode >= 2) {
      if (in.mode == 2) {
        check((in.H + 1) / 2 == Ho && (in.W + 1) / 2 == Wo, op, ": a maxpool input must pool to the output size");
        in.pt = std::max<int64_t>((Ho - 1) * 2 + 3 - in.H, 0) / 2;
        in.pl = std::max<int64_t>((Wo - 1) * 2 + 3 - in.W, 0) / 2;
      } else {
        check((in.H - 1) / 2 + 1 == Ho && (in.W - 1) / 2 + 1 == Wo, op,
              ": a maxpool_sym input must pool to the output size");
        in.pt = in.pl = 1;
      }
    }
  }
  uint8_t* o = data_of<uint8_t>(out);
  std::vector<std::vector<int64_t>> accs(static_cast<size_t>(max_workers(N * Ho, threads)));
  std::vector<std::vector<uint8_t>> pools(accs.size());
  parallel_for(N * Ho, threads, [&](int64_t t, int worker) {
    const int64_t n = t / Ho, oh = t % Ho;
    std::vector<int64_t>& acc = accs[static_cast<size_t>(worker)];
    std::vector<uint8_t>& v = pools[static_cast<size_t>(worker)];
    acc.resize(static_cast<size_t>(C));
    v.resize(static_cast<size_t>(C));
    for (int64_t ow = 0; ow < Wo; ++ow) {
      std::fill(acc.begin(), acc.end(), 0);
      for (const In& in : ins) {
        const uint8_t* src = nullptr;
        if (in.mode == 0) {
          src = in.x + ((n * in.H + oh) * in.W + ow) * C;
        } else if (in.mode == 1) {
          src = in.x + ((n * in.H + in.sh[oh]) * in.W + in.sw[ow]) * C;
        } else {
          std::fill(v.begin(), v.end(), uint8_t{0});
          for (int64_t dh = 0; dh < 3; ++dh) {
            const int64_t ih = oh * 2 - in.pt + dh;
            if (ih < 0 || ih >= in.H) continue;
            for (int64_t dw = 0; dw < 3; ++dw) {
              const int64_t iw = ow * 2 - in.pl + dw;
              if (iw < 0 || iw >= in.W) continue;
              const uint8_t* p = in.x + ((n * in.H + ih) * in.W + iw) * C;
              for (int64_t c = 0; c < C; ++c) v[c] = std::max(v[c], p[c]);
            }
          }
          src = v.data();  // every window has at least one valid pixel (the sizes are checked)
        }
        for (int64_t c = 0; c < C; ++c) acc[c] += (static_cast<int64_t>(src[c]) - in.zp) * in.mult;
      }
      uint8_t* dst = o + ((n * Ho + oh) * Wo + ow) * C;
      for (int64_t c = 0; c < C; ++c) {
        int64_t q = floor_shift16(acc[c] + 32768) + out_zp;
        q = q < qmin ? qmin : (q > qmax ? qmax : q);
        dst[c] = table ? table[q] : static_cast<uint8_t>(q);
      }
    }
  });
}

}  // namespace effops::qconv
