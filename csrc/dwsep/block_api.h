// A whole inverted-residual block in inference (block.cpp): the kernel arguments of one block,
// prepared once by python/effops/nn/_plan.py, and the call that runs the block on an input.
#pragma once
#include <cstdint>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "common/ndarray.h"
#include "dwsep/conv.h"

namespace effops::dwsep {

using Opt = std::optional<CpuArray>;

// The arrays (all float32, C-contiguous) are kept referenced for the plan's lifetime.
// expand_w [C, Cin] or none (no expand: C = Cin); taps [KH, KW, C]; se_reduce_w [R, C] and
// se_expand_w [C, R] or none (no SE); project_w [Co, C]. sources / copies / nbytes: raw
// addresses of the parameters whose prepared form is a copy and of snapshots of them; run()
// refuses (returns false) when a source's bytes no longer equal its snapshot (a write through
// .data bypasses torch's version counter), and the caller prepares the plan again.
class BlockPlan {
 public:
  // The SE gate: simd::kSigmoid or this (relu6(v + 3) / 6: timm's and torchvision's MobileNetV3).
  static constexpr int kGateHardSigmoid = 6;

  BlockPlan(Opt expand_w, Opt expand_scale, Opt expand_bias, int expand_act, CpuArray taps, Opt dw_scale,
            Opt dw_bias, int dw_act, std::vector<int64_t> stride, std::vector<int64_t> dilation,
            Opt se_reduce_w, Opt se_reduce_b, int se_act, Opt se_expand_w, Opt se_expand_b, int se_gate,
            CpuArray project_w, Opt project_scale, Opt project_bias, int project_act, bool residual,
            std::vector<uintptr_t> sources, std::vector<uintptr_t> copies, std::vector<int64_t> nbytes);

  // x [N, H, W, Cin] float32 or bf16, out [N, Ho, Wo, Co] of x's dtype; pads top, bottom, left,
  // right of the depthwise conv. False (nothing written) when a source changed.
  bool run(const CpuArray& x, const CpuArray& out, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
           int threads) const;
  // [Ho, Wo] of an H x W input with these pads.
  std::vector<int64_t> output_hw(int64_t H, int64_t W, int64_t pt, int64_t pb, int64_t pl, int64_t pr) const;
  bool unchanged() const;
  // The expand / projection weights are the caller's parameters read in place (not copies).
  void watch_in_place(bool expand, bool project) {
    amx_->watch_expand = dot_->watch_expand = expand, amx_->watch_project = dot_->watch_project = project;
  }
  // The banded expand -> depthwise path (block.cpp): taken when one image's expanded map is over
  // fuse_bytes, with bands of about band_bytes of expanded rows. Tunable (the tests force many
  // small bands); fuse_bytes < 0 never bands.
  int64_t fuse_bytes() const { return fuse_bytes_; }
  int64_t band_bytes() const { return band_bytes_; }
  void set_fuse_bytes(int64_t v) { fuse_bytes_ = v; }
  void set_band_bytes(int64_t v);

 private:
  float gate(float v) const;
  template <class T>
  void run_t(const T* x, T* out, const ConvGeom& g, int threads) const;
  // The expand and depthwise convs band by band (block.cpp); false: not taken, nothing written.
  // out given (a block without SE): each band's projection too, from a band-sized buffer.
  template <class T>
  bool run_banded(const T* x, T* y, float* sums, const ConvGeom& g, int threads, T* out = nullptr) const;

  // The 1x1 conv y [M, K] -> out [M, Co] of the expand (w = ew_) or the projection (w = pw_):
  // bf16 on the AMX tiles with the weights packed once (amx_), or on vdpbf16ps with them packed
  // once (dot_), else pw_forward (which packs the weights on every call).
  template <class T>
  void pw(bool expand, const T* y, const float* cs, int act, const T* res, T* out, int64_t N, int64_t HW,
          int threads) const;

  // The expand and projection weights as AMX bf16 panels, packed at the first bf16 call with the
  // AMX kernels on (amx_), or as the vdpbf16ps GEMM's panels at the first bf16 call with the AMX
  // kernels off on a CPU with AVX512_BF16 (dot_; a plan may run on several threads at once). A weight the plan reads in place
  // (a float32 parameter, watch_in_place) is snapshotted when packed, and unchanged() compares
  // it from then on: the panels are a copy, and a write through .data bypasses the version
  // counter (timm's ModelEma writes so).
  struct AmxPanels {
    std::once_flag once;
    std::vector<uint16_t> expand, project;
    bool watch_expand = false, watch_project = false;
    std::vector<float> expand_snap, project_snap;
    std::atomic<bool> packed{false};
  };
  std::unique_ptr<AmxPanels> amx_ = std::make_unique<AmxPanels>(), dot_ = std::make_unique<AmxPanels>();
  std::vector<Opt> arrays_;  // keeps every array alive
  std::vector<uintptr_t> sources_, copies_;
  std::vector<int64_t> nbytes_;
  const float *ew_ = nullptr, *es_ = nullptr, *eb_ = nullptr, *taps_ = nullptr, *ds_ = nullptr, *db_ = nullptr;
  const float *srw_ = nullptr, *srb_ = nullptr, *sew_ = nullptr, *seb_ = nullptr;
  const float *pw_ = nullptr, *ps_ = nullptr, *pb_ = nullptr;
  int64_t Cin_ = 0, mid_ = 0, Co_ = 0, R_ = 0, KH_ = 0, KW_ = 0, sh_ = 1, sw_ = 1, dh_ = 1, dw_ = 1;
  int eact_ = 0, dact_ = 0, se_act_ = 0, gate_ = 0, pact_ = 0;
  bool residual_ = false;
  int64_t fuse_bytes_, band_bytes_;
};

}  // namespace effops::dwsep
