// One inverted-residual block in inference as one call (effops.nn MBConv and
// DepthwiseSeparableBlock, EfficientNet's blocks): [expand 1x1 + affine + act] -> depthwise +
// affine + act, with the pooled sums -> [squeeze-excite MLP on the means] -> project 1x1 with the
// gates applied while loading, affine [+ the block's input].
//
// The same kernels as the separate ops (pw_forward, dw_forward), so the results are those of
// the op-by-op path. What the block call saves at small sizes (batch 1): the Python between the
// ops (checks, argument conversion, three kernel calls, the SE MLP as four torch calls), and
// the allocation and first-touch page faults of the two intermediates, which live here in
// buffers reused from call to call (per calling thread). ~100 us of an EfficientNet-B0 block's
// ~700 us at 7x7 was Python (python/effops/nn/_plan.py has the measurements).
#include "dwsep/block_api.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common/parallel.h"
#include "dwsep/conv.h"
#include "dwsep/simd.h"

namespace effops::dwsep {
namespace {

const nb::dlpack::dtype kBF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};

// A buffer that grows to the largest size asked for and is reused; past kKeep bytes it is
// freed after the call instead of kept (a huge input must not pin its intermediates).
class Scratch {
 public:
  static constexpr size_t kKeep = size_t(64) << 20;
  void* get(size_t bytes) {
    if (bytes > cap_) {
      ptr_.reset(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
      check(ptr_ != nullptr, "block_forward: out of memory for ", bytes, " bytes of intermediates");
      cap_ = bytes;
    }
    return ptr_.get();
  }
  void trim() {
    if (cap_ > kKeep) ptr_.reset(), cap_ = 0;
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> ptr_;
  size_t cap_ = 0;
};

struct Buffers {
  Scratch h, y, small, band_y;
};
thread_local Buffers t_buffers;

// The banded path's defaults (BlockPlan::run_banded), measured on EfficientNet-B0, 1 thread, a
// Xeon with 2 MB of L2 per core: the first expanding block (16 -> 96 at 112x112, 4.8 MB map)
// 1.32 -> 1.20 ms at batch 1 and 11.0-12.2 -> 9.8 ms at batch 8; 28x28x240 maps (750 KB) were
// 5-8% slower banded (so: maps over 1 MB only); 128 KB bands were slower than none, 256 KB and
// 1 MB bands alike at batch 1, 1 MB better at batch 8. The whole network: 2-3% at batch 1, 3-5%
// at batch 8.
constexpr int64_t kFuseBytes = int64_t(1) << 20, kBandBytes = int64_t(1) << 20;
constexpr int64_t kImageWise = 784;

template <class T>
float round_to(float v) {
  if constexpr (std::is_same<T, simd::bf16>::value)
    return simd::to_f(simd::bf16{simd::f_to_bf16_bits(v)});
  else
    return v;
}

const float* opt_vec(const Opt& v, int64_t n, const char* name) {
  if (!v) return nullptr;
  check_shape(*v, {n}, "BlockPlan", name);
  check_dtype(*v, nb::dtype<float>(), "BlockPlan", name);
  return data_of<const float>(*v);
}

const float* mat(const CpuArray& a, int64_t rows, int64_t cols, const char* name) {
  check_shape(a, {rows, cols}, "BlockPlan", name);
  check_dtype(a, nb::dtype<float>(), "BlockPlan", name);
  return data_of<const float>(a);
}

}  // namespace

BlockPlan::BlockPlan(Opt expand_w, Opt expand_scale, Opt expand_bias, int expand_act, CpuArray taps,
                     Opt dw_scale, Opt dw_bias, int dw_act, std::vector<int64_t> stride,
                     std::vector<int64_t> dilation, Opt se_reduce_w, Opt se_reduce_b, int se_act,
                     Opt se_expand_w, Opt se_expand_b, int se_gate, CpuArray project_w,
                     Opt project_scale, Opt project_bias, int project_act, bool residual,
                     std::vector<uintptr_t> sources, std::vector<uintptr_t> copies,
                     std::vector<int64_t> nbytes)
    : arrays_{expand_w, expand_scale, expand_bias, taps, dw_scale, dw_bias, se_reduce_w, se_reduce_b,
              se_expand_w, se_expand_b, project_w, project_scale, project_bias},
      sources_(std::move(sources)),
      copies_(std::move(copies)),
      nbytes_(std::move(nbytes)),
      fuse_bytes_(kFuseBytes),
      band_bytes_(kBandBytes) {
  const char* op = "BlockPlan";
  check(taps.ndim() == 3, op, ": taps must be [KH, KW, C]");
  check(project_w.ndim() == 2, op, ": project_w must be [Co, C]");
  check(stride.size() == 2 && dilation.size() == 2, op, ": stride and dilation must have 2 values");
  for (int i = 0; i < 2; ++i)
    check(stride[i] >= 1 && stride[i] <= kMaxSize && dilation[i] >= 1 && dilation[i] <= kMaxSize, op,
          ": stride and dilation must be in [1, ", kMaxSize, "]");
  for (int a : {expand_act, dw_act, se_act, project_act})
    check(a >= simd::kNone && a <= simd::kSigmoid, op, ": unknown activation code ", a);
  check(se_gate == simd::kSigmoid || se_gate == kGateHardSigmoid || !se_reduce_w, op,
        ": the SE gate must be sigmoid or hard sigmoid, got code ", se_gate);
  check(sources_.size() == copies_.size() && sources_.size() == nbytes_.size(), op,
        ": sources, copies and nbytes must have one length");
  for (size_t i = 0; i < sources_.size(); ++i)
    check(nbytes_[i] >= 0 && (nbytes_[i] == 0 || (sources_[i] && copies_[i])), op, ": bad source ", i);
  KH_ = taps.shape(0), KW_ = taps.shape(1), mid_ = taps.shape(2);
  Co_ = project_w.shape(0);
  taps_ = data_of<const float>(taps);
  check_dtype(taps, nb::dtype<float>(), op, "taps");
  pw_ = mat(project_w, Co_, mid_, "project_w");
  if (expand_w) {
    check(expand_w->ndim() == 2, op, ": expand_w must be [C, Cin]");
    Cin_ = expand_w->shape(1);
    ew_ = mat(*expand_w, mid_, Cin_, "expand_w");
  } else {
    Cin_ = mid_;
  }
  es_ = opt_vec(expand_scale, mid_, "expand_scale"), eb_ = opt_vec(expand_bias, mid_, "expand_bias");
  check(ew_ || (!es_ && !eb_), op, ": expand_scale / expand_bias without expand_w");
  ds_ = opt_vec(dw_scale, mid_, "dw_scale"), db_ = opt_vec(dw_bias, mid_, "dw_bias");
  ps_ = opt_vec(project_scale, Co_, "project_scale"), pb_ = opt_vec(project_bias, Co_, "project_bias");
  check(bool(se_reduce_w) == bool(se_expand_w), op, ": se_reduce_w and se_expand_w go together");
  if (se_reduce_w) {
    check(se_reduce_w->ndim() == 2, op, ": se_reduce_w must be [R, C]");
    R_ = se_reduce_w->shape(0);
    check(R_ >= 1, op, ": the squeeze-excite needs >= 1 reduced channel");
    srw_ = mat(*se_reduce_w, R_, mid_, "se_reduce_w");
    sew_ = mat(*se_expand_w, mid_, R_, "se_expand_w");
    srb_ = opt_vec(se_reduce_b, R_, "se_reduce_b"), seb_ = opt_vec(se_expand_b, mid_, "se_expand_b");
  } else {
    check(!se_reduce_b && !se_expand_b, op, ": SE biases without SE weights");
  }
  check(!residual || Cin_ == Co_, op, ": a residual block needs as many output channels as input ones");
  sh_ = stride[0], sw_ = stride[1], dh_ = dilation[0], dw_ = dilation[1];
  eact_ = expand_act, dact_ = dw_act, se_act_ = se_act, gate_ = se_gate, pact_ = project_act;
  residual_ = residual;
}

void BlockPlan::set_band_bytes(int64_t v) {
  check(v >= 1, "BlockPlan: band_bytes must be >= 1, got ", v);
  band_bytes_ = v;
}

float BlockPlan::gate(float v) const {
  if (gate_ == kGateHardSigmoid) return std::min(std::max(v + 3.f, 0.f), 6.f) / 6.f;  // relu6(v + 3) / 6, as torch
  return simd::act_s(v, simd::kSigmoid);
}

bool BlockPlan::unchanged() const {
  for (size_t i = 0; i < sources_.size(); ++i)
    if (nbytes_[i] && std::memcmp(reinterpret_cast<const void*>(sources_[i]), reinterpret_cast<const void*>(copies_[i]),
                                  static_cast<size_t>(nbytes_[i])) != 0)
      return false;
  for (const AmxPanels* a : {amx_.get(), dot_.get()}) {
    if (!a->packed.load(std::memory_order_acquire)) continue;
    if (!a->expand_snap.empty() && std::memcmp(ew_, a->expand_snap.data(), sizeof(float) * a->expand_snap.size()) != 0)
      return false;
    if (!a->project_snap.empty() &&
        std::memcmp(pw_, a->project_snap.data(), sizeof(float) * a->project_snap.size()) != 0)
      return false;
  }
  return true;
}

std::vector<int64_t> BlockPlan::output_hw(int64_t H, int64_t W, int64_t pt, int64_t pb, int64_t pl, int64_t pr) const {
  const char* op = "BlockPlan";
  check(H >= 1 && W >= 1 && H <= kMaxSize && W <= kMaxSize, op, ": bad input size ", H, "x", W);
  for (int64_t p : {pt, pb, pl, pr}) check(p >= 0 && p <= kMaxSize, op, ": padding must be in [0, ", kMaxSize, "]");
  const int64_t eh = H + pt + pb - dh_ * (KH_ - 1) - 1, ew = W + pl + pr - dw_ * (KW_ - 1) - 1;
  check(eh >= 0 && ew >= 0, op, ": the input is smaller than the dilated kernel");
  return {eh / sh_ + 1, ew / sw_ + 1};
}

namespace {

// Output rows [oh0, oh1) of the depthwise conv read input rows [lo, hi) (clipped to the image).
struct RowBand {
  int64_t oh0, oh1, lo, hi;
};
inline RowBand band_rows(const ConvGeom& g, int64_t oh0, int64_t oh1) {
  const int64_t lo = std::max<int64_t>(0, oh0 * g.sh - g.pt);
  const int64_t hi = std::min<int64_t>(g.H, (oh1 - 1) * g.sh - g.pt + (g.KH - 1) * g.dh + 1);
  return {oh0, oh1, lo, hi};
}

}  // namespace

// The expanded map of one image (Cin -> C channels at the input's resolution) is the largest
// tensor of a block: 4.8 MB for EfficientNet-B0's first expanding block at 112x112. Past
// fuse_bytes the expand conv runs band by band into an L2-sized buffer of rows and the depthwise
// conv reads them from there, so the expanded map never goes to memory. Bands of output rows are
// fixed by the shapes (not by the thread count): each band's partial SE sums are added in band
// order, so results do not depend on the threads. One thread walks the bands in order keeping the
// rows two bands share; threads split the bands and recompute a band's first rows.
template <class T>
bool BlockPlan::run_banded(const T* x, T* y, float* sums, const ConvGeom& g, int threads, T* out) const {
  const int64_t row_bytes = static_cast<int64_t>(sizeof(T)) * g.W * mid_;
  if (!ew_ || fuse_bytes_ < 0 || row_bytes * g.H <= fuse_bytes_) return false;
  const int64_t span = (g.KH - 1) * g.dh + 1;  // input rows of one output row
  const int64_t rows_in = std::max<int64_t>(span, band_bytes_ / row_bytes);
  const int64_t R = std::max<int64_t>(1, (rows_in - span) / g.sh + 1);  // output rows per band
  const int64_t bands = (g.Ho + R - 1) / R;
  for (int64_t b = 0; b < bands; ++b) {  // every band reads at least one real row
    const RowBand rb = band_rows(g, b * R, std::min(g.Ho, (b + 1) * R));
    if (rb.hi <= rb.lo) return false;
  }
  const int64_t tasks = g.N * bands, cap = (R - 1) * g.sh + span;
  std::vector<float> part(sums ? static_cast<size_t>(tasks * mid_) : 0);
  // Band t of image n: expand input rows [have, hi) into the band buffer hb (rows [lo, have) are
  // there already: hb holds rows [blo, bhi) of the band before), then the depthwise conv of its
  // output rows, with its SE sums in part.
  auto band = [&](int64_t t, T* hb, int64_t& blo, int64_t& bhi) {
    const int64_t n = t / bands, b = t % bands;
    const RowBand rb = band_rows(g, b * R, std::min(g.Ho, (b + 1) * R));
    int64_t have = rb.lo;
    if (blo <= rb.lo && rb.lo < bhi) {  // rows shared with the band before: move them to the front
      have = std::min(bhi, rb.hi);
      if (rb.lo > blo) std::memmove(hb, hb + (rb.lo - blo) * g.W * mid_, sizeof(T) * (have - rb.lo) * g.W * mid_);
    }
    if (rb.hi > have)
      pw<T>(true, x + ((n * g.H + have) * g.W) * Cin_, nullptr, eact_, nullptr, hb + (have - rb.lo) * g.W * mid_, 1,
            (rb.hi - have) * g.W, 1);
    blo = rb.lo, bhi = rb.hi;
    ConvGeom gb = g;
    gb.N = 1, gb.H = rb.hi - rb.lo, gb.Ho = rb.oh1 - rb.oh0, gb.pt = g.pt + rb.lo - rb.oh0 * g.sh;
    const int64_t o0 = (n * g.Ho + rb.oh0) * g.Wo;  // the band's first output pixel
    if (out) {  // no SE: the band's projection right away, its depthwise rows still in cache
      T* yb = static_cast<T*>(t_buffers.band_y.get(sizeof(T) * R * g.Wo * mid_));
      dw_forward<T>(hb, taps_, ds_, db_, gb, dact_, simd::kNone, yb, nullptr, 1);
      pw<T>(false, yb, nullptr, pact_, residual_ ? x + o0 * Cin_ : nullptr, out + o0 * Co_, 1, gb.Ho * g.Wo, 1);
      return;
    }
    dw_forward<T>(hb, taps_, ds_, db_, gb, dact_, simd::kNone, y + o0 * mid_, sums ? part.data() + t * mid_ : nullptr,
                  1);
  };
  const int workers = std::min<int64_t>(threads, tasks);
  if (workers <= 1) {
    T* hb = static_cast<T*>(t_buffers.h.get(sizeof(T) * cap * g.W * mid_));
    int64_t blo = 0, bhi = 0;
    for (int64_t t = 0; t < tasks; ++t) {
      if (t % bands == 0) blo = bhi = 0;  // a new image shares no rows
      band(t, hb, blo, bhi);
    }
  } else {
    parallel_for(tasks, workers, [&](int64_t t, int) {
      int64_t blo = 0, bhi = 0;
      band(t, static_cast<T*>(t_buffers.h.get(sizeof(T) * cap * g.W * mid_)), blo, bhi);
    });
  }
  if (sums) {
    std::fill(sums, sums + g.N * mid_, 0.f);
    for (int64_t t = 0; t < tasks; ++t) {
      float* s = sums + (t / bands) * mid_;
      for (int64_t c = 0; c < mid_; ++c) s[c] += part[t * mid_ + c];
    }
  }
  return true;
}

template <class T>
void BlockPlan::pw(bool expand, const T* y, const float* cs, int act, const T* res, T* out, int64_t N, int64_t HW,
                   int threads) const {
  const float* w = expand ? ew_ : pw_;
  const int64_t K = expand ? Cin_ : mid_, Co = expand ? mid_ : Co_;
  const float* scale = expand ? es_ : ps_;
  const float* bias = expand ? eb_ : pb_;
  if constexpr (std::is_same<T, simd::bf16>::value) {
    const bool amx = ::effops::amx();
    if (amx || bf16dot_cpu()) {
      AmxPanels& p = amx ? *amx_ : *dot_;
      std::call_once(p.once, [&] {
        if (ew_) p.expand = pack_pw_bf16(amx, ew_, mid_, Cin_);
        p.project = pack_pw_bf16(amx, pw_, Co_, mid_);
        if (ew_ && p.watch_expand && !p.expand.empty()) p.expand_snap.assign(ew_, ew_ + mid_ * Cin_);
        if (p.watch_project && !p.project.empty()) p.project_snap.assign(pw_, pw_ + Co_ * mid_);
        p.packed.store(true, std::memory_order_release);
      });
      const std::vector<uint16_t>& panels = expand ? p.expand : p.project;
      if (!panels.empty() &&
          pw_forward_bf16(amx, y, panels.data(), cs, scale, bias, act, res, out, N, HW, K, Co, threads))
        return;
    }
  }
  pw_forward<T>(y, w, cs, scale, bias, act, res, out, N, HW, K, Co, threads);
}

template <class T>
void BlockPlan::run_t(const T* x, T* out, const ConvGeom& g, int threads) const {
  if (g.N > 1 && g.H * g.W >= kImageWise) {  // image by image: the intermediates stay in L2
    ConvGeom g1 = g;
    g1.N = 1;
    auto image = [&](int64_t n, int t) { run_t<T>(x + n * g.H * g.W * Cin_, out + n * g.Ho * g.Wo * Co_, g1, t); };
    if (threads > 1 && g.N >= threads)  // a thread per image: no sync points inside, each core's L2 its own
      parallel_for(g.N, threads, [&](int64_t n, int) { image(n, 1); });
    else
      for (int64_t n = 0; n < g.N; ++n) image(n, threads);
    return;
  }
  Buffers& buf = t_buffers;
  const int64_t N = g.N, HWi = g.H * g.W, HWo = g.Ho * g.Wo;
  T* y = static_cast<T*>(buf.y.get(sizeof(T) * N * HWo * mid_));
  float* sums = nullptr;
  float* gates = nullptr;
  if (srw_) {
    float* s = static_cast<float*>(buf.small.get(sizeof(float) * (2 * N * mid_ + R_)));
    sums = s, gates = s + N * mid_;
  }
  if (!srw_ && run_banded<T>(x, y, nullptr, g, threads, out)) {  // no SE: projected band by band
    buf.h.trim(), buf.y.trim(), buf.band_y.trim();
    return;
  }
  if (!run_banded<T>(x, y, sums, g, threads)) {
    const T* h = x;
    if (ew_) {
      T* hb = static_cast<T*>(buf.h.get(sizeof(T) * N * HWi * mid_));
      pw<T>(true, x, nullptr, eact_, nullptr, hb, N, HWi, threads);
      h = hb;
    }
    dw_forward<T>(h, taps_, ds_, db_, g, dact_, simd::kNone, y, sums, threads);
  }
  if (srw_) {
    // As the op-by-op path: means rounded to the storage type, the MLP in float, the gates
    // rounded to the storage type (pw_conv takes them in x's dtype).
    float* r = gates + N * mid_;
    const float inv_n = static_cast<float>(HWo);
    for (int64_t n = 0; n < N; ++n) {
      float* m = sums + n * mid_;  // the means replace the sums
      for (int64_t c = 0; c < mid_; ++c) m[c] = round_to<T>(m[c] / inv_n);
      for (int64_t j = 0; j < R_; ++j)
        r[j] = simd::act_s(simd::dot8(srw_ + j * mid_, m, mid_) + (srb_ ? srb_[j] : 0.f), se_act_);
      float* gn = gates + n * mid_;
      for (int64_t c = 0; c < mid_; ++c)
        gn[c] = round_to<T>(gate(simd::dot8(sew_ + c * R_, r, R_) + (seb_ ? seb_[c] : 0.f)));
    }
  }
  pw<T>(false, y, gates, pact_, residual_ ? x : nullptr, out, N, HWo, threads);
  buf.h.trim(), buf.y.trim();
}

bool BlockPlan::run(const CpuArray& x, const CpuArray& out, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                    int threads) const {
  const char* op = "BlockPlan.run";
  check(x.ndim() == 4, op, ": x must be NHWC [N, H, W, C]");
  check(static_cast<int64_t>(x.shape(3)) == Cin_, op, ": x has ", x.shape(3), " channels, the block ", Cin_);
  const std::vector<int64_t> ohw = output_hw(x.shape(1), x.shape(2), pt, pb, pl, pr);
  ConvGeom g{};
  g.N = x.shape(0), g.H = x.shape(1), g.W = x.shape(2), g.C = mid_;
  g.Ho = ohw[0], g.Wo = ohw[1], g.KH = KH_, g.KW = KW_, g.sh = sh_, g.sw = sw_, g.pt = pt, g.pl = pl;
  g.dh = dh_, g.dw = dw_;
  check_shape(out, {g.N, g.Ho, g.Wo, Co_}, op, "out");
  check(out.dtype() == x.dtype(), op, ": out must have the dtype of x");
  check(!residual_ || (g.Ho == g.H && g.Wo == g.W), op, ": a residual block must keep the size");
  if (!unchanged()) return false;
  if (x.dtype() == nb::dtype<float>())
    run_t<float>(data_of<const float>(x), data_of<float>(out), g, threads);
  else if (x.dtype() == kBF16)
    run_t<simd::bf16>(data_of<const simd::bf16>(x), data_of<simd::bf16>(out), g, threads);
  else
    fail(op, ": x must be float32 or bfloat16, got ", dtype_name(x.dtype()));
  return true;
}

}  // namespace effops::dwsep
