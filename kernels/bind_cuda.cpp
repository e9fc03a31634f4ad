// effops._cuda: the CUDA kernels. One m.def per entry point; launch logic lives in
// kernels/<family>/. Streams arrive as integers (torch.cuda.current_stream().cuda_stream) with
// the device index; the module links the CUDA runtime statically and never touches libtorch.
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "common/cuda_check.h"
#include "common/errors.h"
#include "bifpn/fuse.cuh"
#include "bifpn/fuse_api_cuda.h"
#include "dwsep/dwsep.cuh"
#include "dwsep/dwsep_api_cuda.h"
#include "losses/losses_api_cuda.h"
#include "nms/nms_api_cuda.h"
#include "qconv/qconv_api_cuda.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_cuda, m) {
  m.doc() = "effops CUDA kernels. Called by effops.ops; not a public API.";
  const auto release = nb::call_guard<nb::gil_scoped_release>();

  m.def("device_count", []() {
    int n = 0;
    effops::cuda::check_cuda(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
    return n;
  });
  m.def("build_info", []() {
    nb::dict d;
    d["version"] = EFFOPS_VERSION;
    d["cuda_runtime"] = CUDART_VERSION;
    d["nvcc"] = EFFOPS_CUDA_COMPILER_VERSION;
    d["archs"] = EFFOPS_CUDA_ARCHS;
    return d;
  });

  m.def("nms_keep", &effops::cuda::nms::nms_keep_api, "boxes"_a, "seg_end"_a, "counts"_a,
        "threshold"_a, "mask"_a.noconvert(), "removed"_a.noconvert(), "keep"_a.noconvert(),
        "stream"_a, "device"_a, release);
  m.def("soft_nms", &effops::cuda::nms::soft_nms_api, "boxes"_a, "scores"_a, "threshold"_a,
        "sigma"_a, "method"_a, "score_threshold"_a, "keep"_a.noconvert(),
        "scores_out"_a.noconvert(), "work"_a.noconvert(), "count"_a.noconvert(), "stream"_a,
        "device"_a, release);
  m.def("matrix_nms_decay", &effops::cuda::nms::matrix_decay_api, "boxes"_a, "seg_start"_a,
        "kernel"_a, "sigma"_a, "cmax"_a.noconvert(), "decay"_a.noconvert(), "stream"_a,
        "device"_a, release);

  namespace dw = effops::cuda::dwsep;
  m.def("dwsep_forward", &dw::dwsep_forward_api, "x"_a, "taps"_a, "pw"_a, "dw_scale"_a.none(),
        "dw_bias"_a.none(), "pw_scale"_a.none(), "pw_bias"_a.none(), "residual"_a.none(), "stride"_a,
        "pad"_a, "dilation"_a, "act"_a, "pw_act"_a, "preact"_a, "out"_a.noconvert(), "stream"_a,
        "device"_a, release);
  m.def("dw_forward", &dw::dw_forward_api, "x"_a, "taps"_a, "scale"_a.none(), "bias"_a.none(),
        "stride"_a, "pad"_a, "dilation"_a, "act"_a, "y"_a.noconvert(), "part"_a.noconvert(),
        "stream"_a, "device"_a, release);
  m.def("pw_forward", &dw::pw_forward_api, "a"_a, "w"_a, "channel_scale"_a.none(), "scale"_a.none(),
        "bias"_a.none(), "act"_a, "residual"_a.none(), "out"_a.noconvert(), "stream"_a, "device"_a,
        release);
  m.def("dw_backward", &dw::dw_backward_api, "a"_a, "taps"_a, "gd"_a, "stride"_a, "pad"_a,
        "dilation"_a, "ga"_a.noconvert(), "part"_a.noconvert(), "stream"_a, "device"_a, release);
  m.attr("dw_pixels_per_block") = dw::kDwPixels;

  namespace bf = effops::cuda::bifpn;
  m.def("fuse_forward", &bf::fuse_forward_api, "inputs"_a, "weights"_a, "modes"_a, "scales"_a, "pads"_a,
        "act"_a, "out"_a.noconvert(), "stream"_a, "device"_a, release);
  m.def("fuse_backward", &bf::fuse_backward_api, "grad"_a, "inputs"_a, "weights"_a, "modes"_a, "scales"_a,
        "pads"_a, "act"_a, "gpre"_a.noconvert(), "part"_a.noconvert(), "grads"_a.noconvert(), "stream"_a,
        "device"_a, release);
  m.attr("fuse_threads") = bf::kFuseThreads;

  namespace lo = effops::cuda::losses;
  m.def("focal_loss", &lo::focal_loss_api, "logits"_a, "targets"_a, "ignore"_a.none(), "alpha"_a, "gamma"_a,
        "label_smoothing"_a, "loss_out"_a.noconvert().none(), "partial"_a.noconvert().none(),
        "grad"_a.noconvert().none(), "stream"_a, "device"_a, release);
  m.def("focal_blocks", &lo::focal_blocks, "n"_a);
  m.def("box_loss", &lo::box_loss_api, "pred"_a, "target"_a, "mask"_a, "kind"_a, "delta"_a,
        "loss_out"_a.noconvert().none(), "partial"_a.noconvert().none(), "grad"_a.noconvert().none(), "stream"_a,
        "device"_a, release);
  m.def("box_blocks", &lo::box_blocks, "n"_a);
  m.def("match_anchors", &lo::match_anchors_api, "anchors"_a, "gt_boxes"_a, "labels"_a, "valid"_a,
        "match_threshold"_a, "unmatched_threshold"_a, "ignored_class"_a, "keys"_a.noconvert(),
        "cls_out"_a.noconvert(), "box_out"_a.noconvert(), "npos_out"_a.noconvert(), "stream"_a, "device"_a,
        release);

  namespace qc = effops::cuda::qconv;
  m.def("q_dw_forward", &qc::q_dw_forward_api, "x"_a, "taps"_a, "bias"_a.none(), "mult"_a, "lut"_a.none(),
        "stride"_a, "pad"_a, "x_zp"_a, "out_zp"_a, "qmin"_a, "qmax"_a, "y"_a.noconvert(), "sums"_a.noconvert(),
        "stream"_a, "device"_a, release);
  m.def("q_pw_forward", &qc::q_pw_forward_api, "x"_a, "w"_a, "bias"_a.none(), "mult"_a, "lut"_a.none(),
        "gate"_a.none(), "residual"_a.none(), "x_zp"_a, "out_zp"_a, "qmin"_a, "qmax"_a, "res_zp"_a, "res_mult"_a,
        "out"_a.noconvert(), "stream"_a, "device"_a, release);
}
